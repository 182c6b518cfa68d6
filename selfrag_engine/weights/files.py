"""Writing checkpoint directories (`convert`, `quantize`): safetensors files with the permissions any other
file gets, and a staging directory beside the destination that is renamed into place only once complete, so
a failed or interrupted write leaves no half-written checkpoint behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from selfrag_engine.errors import CheckpointError


def _umask() -> int:
    # The only portable way to read the umask is to set it; it is put back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, which creates files as 0600 (readable by their owner only), then the mode
    open() would have given (0666 less the umask), so a shared model directory stays readable."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())


def check_destination(src: Path, dst: Path) -> None:
    """CheckpointError unless `dst` is a new path or an empty directory other than `src`."""
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"the destination '{dst}' is the source checkpoint itself; choose a new directory")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"the destination '{dst}' already exists and is not an empty directory; "
                              "choose a new or empty directory")


@contextmanager
def staged_directory(dst: Path) -> Iterator[Path]:
    """A temporary directory next to `dst` (same file system, so the final rename is atomic) to write the
    checkpoint into; renamed to `dst` when the block ends normally and removed when it raises."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        if dst.is_dir():
            dst.rmdir()  # empty, as check_destination made sure
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
