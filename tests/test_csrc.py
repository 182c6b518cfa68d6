"""Builds the C++ sources outside setup.py: the block manager's own test program with strict warnings, and
again with colliding hashes under sanitizers."""
from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@functools.lru_cache(maxsize=None)
def _sanitizers_work() -> bool:
    """Some toolchains ship g++ without the sanitizer runtimes; the test then runs without them."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "probe.cpp", Path(tmp) / "probe"
        src.write_text("int main() { return 0; }\n")
        built = _run(["g++", *SANITIZERS, str(src), "-o", str(exe)], Path(tmp))
        return built.returncode == 0 and _run([str(exe)], Path(tmp)).returncode == 0


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("hashes", ["exact", "colliding"])
def test_block_manager_program(tmp_path, hashes):
    flags = ["-O1"]
    if hashes == "colliding":
        flags.append("-DSELFRAG_BLOCK_HASH_MASK=3")
        if _sanitizers_work():
            flags += SANITIZERS
    exe = tmp_path / "test_block_manager"
    build = _run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", *flags, "-I", str(CSRC / "include"),
                  str(CSRC / "tests" / "test_block_manager.cpp"), "-o", str(exe)], ROOT)
    assert build.returncode == 0, build.stderr
    result = _run([str(exe)], ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(" passed, 0 failed"), result.stdout + result.stderr


def test_extension_exports_block_manager():
    from selfrag_engine import _C

    assert _C.abi_version() == 1
    for name in ("BlockManager", "OutOfBlocksError", "UnknownSequenceError", "DuplicateSequenceError"):
        assert hasattr(_C, name), f"selfrag_engine._C lacks {name}; rebuild with pip install -e ."
