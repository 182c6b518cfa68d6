"""Naming a model: a checkpoint directory, `tiny` (the embedded model), or a Hugging Face model id.

Every entry point that takes a model (`Engine.from_pretrained`, the `--model` of every command, the server,
the C++ `EngineOptions::model`) resolves it here, in this order:

1. an existing directory (or file, which the checkpoint checks then refuse with a clear message) is used as is;
2. `tiny` / `tiny_selfrag` names the embedded tiny Self-RAG model, wherever the package is installed;
3. a Hugging Face model id (`ORG/NAME` or `NAME`) is looked up through `huggingface_hub.snapshot_download`,
   in the cache that huggingface_hub uses (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else
   `~/.cache/huggingface/hub`), at `revision` (a branch, tag or commit; default `main`). It reads only the
   local cache unless a download is asked for (`download=True`, `--download`) and the hub is not switched off
   (`HF_HUB_OFFLINE=1`); a download shows huggingface_hub's progress bars and fetches only the files the
   engine reads (the safetensors weights when the repository has them, else the `.bin` ones);
4. anything else is returned as a path, for the checks that follow to name what is wrong with it.

huggingface_hub is imported only when an id is looked up.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from selfrag_engine.errors import CheckpointError

EMBEDDED_MODEL_NAMES = ("tiny", "tiny_selfrag")
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "data" / "tiny_selfrag"

# The files of a checkpoint repository the engine reads (config, tokenizer, weights and their index).
_METADATA_PATTERNS = ["*.json", "tokenizer.model"]
_WEIGHT_PATTERNS = {"safetensors": ["*.safetensors"], "bin": ["*.bin"]}


def embedded_model_dir() -> Path:
    """The embedded tiny Self-RAG checkpoint (`selfrag_engine/data/tiny_selfrag`), named `tiny`."""
    return EMBEDDED_MODEL_DIR


def is_model_id(name: str) -> bool:
    """Whether `name` has the form of a Hugging Face model id (`ORG/NAME` or `NAME`), by huggingface_hub's
    own rule; a path with more parts, a leading `.`, `/` or `~` is not one."""
    if not name or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def download_patterns(repo_files: Iterable[str]) -> list[str]:
    """What a download fetches of a repository listing: its JSON files, the tokenizer and one weight format
    (safetensors when the repository has it, as the loader prefers it, else `.bin`), never both."""
    files = list(repo_files)
    weights = "safetensors" if any(f.endswith(".safetensors") for f in files) else "bin"
    return _METADATA_PATTERNS + _WEIGHT_PATTERNS[weights]


def hub_cache_dir() -> str:
    """The cache huggingface_hub reads and writes (HF_HUB_CACHE, else $HF_HOME/hub, else its default)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve_model(model: str | Path, revision: str | None = None, *, download: bool = False,
                  cache_dir: str | Path | None = None) -> Path:
    """The local checkpoint directory that `model` names (see the module's docstring for the rules).

    Raises CheckpointError for an id that is not in the cache (saying how to get it), an unknown revision, or
    a revision asked of a local directory.
    """
    if isinstance(model, Path) or Path(model).expanduser().exists():
        if revision is not None:
            raise CheckpointError(f"revision {revision!r} asked for, but '{model}' is a local directory, "
                                  "not a Hugging Face model id")
        return Path(model).expanduser()
    name = str(model)
    if name in EMBEDDED_MODEL_NAMES:
        if revision is not None:
            raise CheckpointError(f"revision {revision!r} asked for, but '{name}' is the embedded model")
        return EMBEDDED_MODEL_DIR
    if not is_model_id(name):
        return Path(name).expanduser()
    return _from_hub(name, revision, download, cache_dir)


def _from_hub(repo_id: str, revision: str | None, download: bool, cache_dir: str | Path | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = str(cache_dir) if cache_dir is not None else hub_cache_dir()
    at = f" at revision {revision!r}" if revision else ""
    offline = hub_offline()
    if not download or offline:
        try:
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
        except LocalEntryNotFoundError:
            how = ("HF_HUB_OFFLINE is set, so nothing is downloaded; unset it and add --download "
                   "(download=True) to fetch it" if offline else
                   "add --download (download=True) to fetch it from the Hugging Face Hub")
            raise CheckpointError(f"'{repo_id}' is not a directory, and the Hugging Face cache ({cache}) holds no "
                                  f"snapshot of model '{repo_id}'{at}: {how}") from None
    try:
        info = HfApi().model_info(repo_id, revision=revision)
        files = [s.rfilename for s in info.siblings or []]
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=download_patterns(files)))
    except GatedRepoError:
        raise CheckpointError(f"model '{repo_id}' is gated: accept its terms on the Hub and log in "
                              "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"no model '{repo_id}' on the Hugging Face Hub (or it is private: log in)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"model '{repo_id}' has no revision {revision!r}") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"downloading '{repo_id}'{at} failed: {' '.join(str(e).split())}") from None
