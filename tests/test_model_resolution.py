"""Naming a model as a user does: a directory, `tiny`, or a Hugging Face model id read from the local Hugging
Face cache (HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE, a revision), through the command line and the Python API,
run from another directory. The cache is laid out as huggingface_hub writes it (blobs named by their git or
LFS hash, snapshots of symlinks, refs) and huggingface_hub itself is asked to read it back."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name

from selfrag_engine.entrypoints.model_args import model_name
from selfrag_engine.errors import CheckpointError
from selfrag_engine.hub import download_patterns, embedded_model_dir, is_model_id, resolve_model

REPO = "selfrag-test/tiny_selfrag"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"
PROMPT = "### Instruction:\nWhere was Hirnbem Kakravu born?\n\n### Response:\n"
CLI = [sys.executable, "-m", "selfrag_engine.entrypoints.cli"]


def _blob_name(path: Path) -> str:
    """The name huggingface_hub gives a file's blob: the sha256 of an LFS file (weights), the git blob sha1
    of any other."""
    data = path.read_bytes()
    if path.suffix in (".safetensors", ".bin"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def place_in_hf_cache(cache: Path, repo_id: str, src: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Puts the files of `src` into `cache` as snapshot `commit` of model `repo_id`, as huggingface_hub lays
    out its cache: the content in blobs/, the snapshot as relative symlinks to them, each ref naming the commit."""
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(src.iterdir()):
        blob = repo / "blobs" / _blob_name(file)
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """HF_HOME with the embedded model in its hub cache at COMMIT (refs main), and a second snapshot OTHER
    (tag v1) holding only its config."""
    home = tmp_path_factory.mktemp("hf_home")
    place_in_hf_cache(home / "hub", REPO, embedded_model_dir(), COMMIT)
    only_config = tmp_path_factory.mktemp("only_config")
    (only_config / "config.json").write_bytes((embedded_model_dir() / "config.json").read_bytes())
    place_in_hf_cache(home / "hub", REPO, only_config, OTHER, refs=("v1",))
    return home


def test_huggingface_hub_reads_the_cache_as_laid_out(hf_home):
    info = scan_cache_dir(hf_home / "hub")
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    revisions = {r.commit_hash: set(r.refs) for r in repo.revisions}
    assert revisions == {COMMIT: {"main"}, OTHER: {"v1"}}
    found = try_to_load_from_cache(REPO, "model.safetensors", cache_dir=hf_home / "hub")
    assert isinstance(found, str) and Path(found).parent.name == COMMIT
    assert Path(found).read_bytes() == (embedded_model_dir() / "model.safetensors").read_bytes()


def test_ids_resolve_to_their_snapshot_at_the_revision_asked(hf_home):
    cache = hf_home / "hub"
    snapshots = cache / repo_folder_name(repo_id=REPO, repo_type="model") / "snapshots"
    assert resolve_model(REPO, cache_dir=cache) == snapshots / COMMIT
    assert resolve_model(REPO, "main", cache_dir=cache) == snapshots / COMMIT
    assert resolve_model(REPO, "v1", cache_dir=cache) == snapshots / OTHER
    assert resolve_model(REPO, OTHER, cache_dir=cache) == snapshots / OTHER
    with pytest.raises(CheckpointError, match=r"holds no snapshot of model 'selfrag-test/tiny_selfrag' at "
                                              r"revision 'v2'.*--download"):
        resolve_model(REPO, "v2", cache_dir=cache)
    with pytest.raises(CheckpointError, match=r"'nobody/nothing' is not a directory.*holds no snapshot"):
        resolve_model("nobody/nothing", cache_dir=cache)


def test_tiny_names_the_embedded_model_and_paths_stay_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model("tiny") == resolve_model("tiny_selfrag") == embedded_model_dir()
    assert (embedded_model_dir() / "config.json").is_file()
    (tmp_path / "tiny").mkdir()  # a directory of that name, where the user stands, is theirs
    assert resolve_model("tiny") == Path("tiny")
    for path in ("./missing", "/abs/missing", "a/b/c", "~/x"):
        assert not is_model_id(path)
        assert resolve_model(path) == Path(path).expanduser()
    assert is_model_id("selfrag/selfrag_llama2_7b") and is_model_id("gpt2")
    with pytest.raises(CheckpointError, match="revision 'v1' asked for, but 'tiny_selfrag' is the embedded model"):
        resolve_model("tiny_selfrag", "v1")
    with pytest.raises(CheckpointError, match="revision 'v1' asked for, but 'tiny' is a local directory"):
        resolve_model("tiny", "v1")


def test_the_served_name_is_the_id_or_the_directory_name(hf_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snapshot = resolve_model(REPO, cache_dir=hf_home / "hub")
    assert model_name(REPO, snapshot) == REPO  # as vLLM serves an id
    assert model_name("tiny", embedded_model_dir()) == "tiny_selfrag"
    (tmp_path / "my_model").mkdir()
    assert model_name("my_model", Path("my_model")) == "my_model"


def test_a_download_fetches_one_weight_format():
    safetensors_repo = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                        "pytorch_model.bin", "tokenizer.model"]
    assert download_patterns(safetensors_repo) == ["*.json", "tokenizer.model", "*.safetensors"]
    assert download_patterns(["config.json", "pytorch_model-00001-of-00002.bin"]) == \
        ["*.json", "tokenizer.model", "*.bin"]


def _generate(model: str, cwd: Path, env: dict[str, str]) -> dict:
    result = subprocess.run(CLI + ["generate", "--model", model, PROMPT, "--max-tokens", "24", "--json", "--quiet",
                                   "--keep-special-tokens"],
                            capture_output=True, text=True, cwd=cwd, env={**os.environ, **env}, timeout=600)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    return json.loads(line)


@pytest.fixture(scope="module")
def by_path(tmp_path_factory) -> dict:
    """`generate --model <the embedded model's directory>`: what the other names must answer."""
    out = _generate(str(embedded_model_dir()), tmp_path_factory.mktemp("by_path"), {})
    assert out["token_ids"] and out["finish_reason"] in ("stop", "length")
    return out


@pytest.mark.slow
def test_generate_with_an_id_offline_or_tiny_answers_as_the_path_does(hf_home, by_path, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    by_id = _generate(REPO, elsewhere, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_home / "hub")})
    by_name = _generate("tiny", elsewhere, {})
    assert by_id == by_path
    assert by_name == by_path


@pytest.mark.slow
def test_from_pretrained_with_an_id_answers_as_the_path_does(hf_home, tmp_path):
    script = (
        "import json, sys\n"
        "from selfrag_engine import Engine, SamplingParams\n"
        "from selfrag_engine.hub import embedded_model_dir\n"
        "p = SamplingParams(max_tokens=24, temperature=0.0, skip_special_tokens=False)\n"
        f"outs = [Engine.from_pretrained(m, progress=False).generate([{PROMPT!r}], p)[0] for m in "
        f"({REPO!r}, str(embedded_model_dir()))]\n"
        "print(json.dumps([[o.text, o.token_ids] for o in outs]))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    by_id, by_path = json.loads(result.stdout)
    assert by_id == by_path and by_id[1]


def test_an_id_missing_from_the_cache_offline_is_one_line_naming_the_cache(hf_home, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_home / "hub")}
    result = subprocess.run(CLI + ["generate", "--model", "selfrag/selfrag_llama2_7b", "hi"], capture_output=True,
                            text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("selfrag-engine: error: 'selfrag/selfrag_llama2_7b' is not a directory")
    assert str(hf_home / "hub") in line and "HF_HUB_OFFLINE is set" in line


class _FakeHub:
    """The Hub routes huggingface_hub's own client calls to download a snapshot (model info, at a revision or
    not; the file tree, which 1.x reads; then HEAD and GET of each file under /resolve/), served from a local
    directory on 127.0.0.1, recording every file asked for. The listing also names a `.bin` copy of the
    weights, which a download must not fetch."""

    def __init__(self, repo_id: str, src: Path, commit: str):
        import http.server
        import threading

        files = {f.name: f.read_bytes() for f in sorted(src.iterdir())}
        listing = sorted(files) + ["pytorch_model.bin"]
        self.fetched: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _route(self, head: bool) -> None:
                path = self.path.split("?")[0]
                if path == f"/api/models/{repo_id}" or path.startswith(f"/api/models/{repo_id}/revision/"):
                    body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                                       "siblings": [{"rfilename": n} for n in listing]}).encode()
                    return self._send(200, body, {"Content-Type": "application/json"}, head)
                if path.startswith(f"/api/models/{repo_id}/tree/"):  # huggingface_hub 1.x lists the tree
                    tree = [{"type": "file", "path": n, "size": len(files.get(n, b"")),
                             "oid": _blob_name_of(n, files.get(n, b""))} for n in listing]
                    return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
                prefix = f"/{repo_id}/resolve/"
                if path.startswith(prefix):
                    name = path[len(prefix):].split("/", 1)[1]
                    if name not in files:
                        return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
                    if not head:
                        hub.fetched.append(name)
                    data = files[name]
                    return self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{_blob_name_of(name, data)}"',
                                                  "Content-Type": "application/octet-stream"}, head)
                self._send(404, b"", {}, head)

            def do_HEAD(self):
                self._route(True)

            def do_GET(self):
                self._route(False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "_FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _blob_name_of(name: str, data: bytes) -> str:
    if name.endswith((".safetensors", ".bin")):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.mark.slow
def test_download_fetches_the_checkpoint_files_with_progress_then_answers_offline(by_path, tmp_path):
    cache = tmp_path / "cache"
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_OFFLINE": "0"}
    with _FakeHub(REPO, embedded_model_dir(), COMMIT) as hub:
        env["HF_ENDPOINT"] = hub.url
        # Online but not asked: nothing is fetched, and the message says how to ask.
        result = subprocess.run(CLI + ["generate", "--model", REPO, PROMPT], capture_output=True, text=True,
                                cwd=tmp_path, env={**os.environ, **env}, timeout=300)
        assert result.returncode == 2 and "add --download" in result.stderr and hub.fetched == []
        result = subprocess.run(CLI + ["generate", "--model", REPO, "--download", PROMPT, "--max-tokens", "24",
                                       "--json", "--quiet", "--keep-special-tokens"],
                                capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **env},
                                timeout=600)
        assert result.returncode == 0, result.stderr
        assert "Fetching" in result.stderr  # huggingface_hub's progress bar
    assert json.loads(result.stdout) == by_path
    fetched = set(hub.fetched)
    assert "model.safetensors" in fetched and "tokenizer.model" in fetched and "config.json" in fetched
    assert "pytorch_model.bin" not in fetched and "corpus.jsonl" not in fetched and "MODEL_CARD.md" not in fetched
    # What was downloaded is a snapshot huggingface_hub reads back, and answers with the hub switched off.
    (repo,) = scan_cache_dir(cache).repos
    assert repo.repo_id == REPO and {r.commit_hash for r in repo.revisions} == {COMMIT}
    assert _generate(REPO, tmp_path, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}) == by_path


def test_the_readme_generate_line_runs_as_written_from_another_directory(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    (line,) = [ln for ln in readme.splitlines() if ln.startswith("selfrag-engine generate --model tiny ")]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", "-c", line + " --quiet"], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and result.stderr == ""
