"""What a user meets first when something is wrong, through the command line as they run it: one line naming
the real problem, exit status 2, before any slow work (the model is never loaded in these cases: loading it
fails the test)."""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys

import pytest

from selfrag_engine.engine.llm_engine import Engine
from selfrag_engine.entrypoints.cli import build_parser, main
from selfrag_engine.hub import embedded_model_dir
from selfrag_engine.tiny.assets import read_corpus

@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: each error must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")
    monkeypatch.setattr(Engine, "from_pretrained", classmethod(refuse))


def _cli(capsys, argv: list[str]) -> str:
    """The one stderr line of a command that fails with status 2."""
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("selfrag-engine: error: ")
    return lines[0]


def _copy_model(tmp_path, without: tuple[str, ...] = ()):
    dst = tmp_path / "model"
    shutil.copytree(embedded_model_dir(), dst)
    for name in without:
        (dst / name).unlink()
    return dst


PROMPT = "### Instruction:\nName a color.\n\n### Response:\n"


def test_a_missing_directory(capsys, tmp_path, no_model_load):
    line = _cli(capsys, ["generate", "--model", str(tmp_path / "nowhere" / "model"), PROMPT])
    assert f"model directory '{tmp_path / 'nowhere' / 'model'}' does not exist" in line
    assert "TokenizerError" not in line and "tokenizer directory" not in line


def test_a_file_instead_of_its_directory(capsys, tmp_path, no_model_load):
    model = _copy_model(tmp_path)
    line = _cli(capsys, ["generate", "--model", str(model / "config.json"), PROMPT])
    assert f"'{model / 'config.json'}' is a file, not a checkpoint directory" in line
    assert f"pass the directory that holds it ('{model}')" in line


def test_an_empty_directory(capsys, tmp_path, no_model_load):
    (tmp_path / "empty").mkdir()
    line = _cli(capsys, ["ask", "--model", str(tmp_path / "empty"), "--mode", "never", "Who?"])
    assert f"model directory '{tmp_path / 'empty'}' is empty" in line


def test_no_config_json(capsys, tmp_path, no_model_load):
    model = _copy_model(tmp_path, without=("config.json",))
    line = _cli(capsys, ["generate", "--model", str(model), PROMPT])
    assert f"'{model}' has no config.json: not a Hugging Face checkpoint directory" in line


def test_no_tokenizer(capsys, tmp_path, no_model_load):
    model = _copy_model(tmp_path, without=("tokenizer.model",))
    line = _cli(capsys, ["generate", "--model", str(model), PROMPT])
    assert f"'{model / 'tokenizer.model'}' is missing: the checkpoint has no tokenizer" in line


def test_a_bad_model_fails_before_the_index_loads(capsys, tmp_path, no_model_load, monkeypatch):
    from selfrag_engine.retrieval import retriever

    monkeypatch.setattr(retriever.Retriever, "load", classmethod(lambda *a, **k: pytest.fail("index loaded")))
    line = _cli(capsys, ["ask", "--model", str(tmp_path / "missing"), "--index", str(tmp_path), "Who?"])
    assert "does not exist" in line


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_serve_on_a_port_in_use(capsys, no_model_load):
    with _listening_socket() as taken:
        port = taken.getsockname()[1]
        line = _cli(capsys, ["serve", "--model", "tiny", "--port", str(port)])
    assert f"port {port} on 127.0.0.1 is already in use" in line


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_serve_on_a_port_out_of_range(capsys, no_model_load, port):
    line = _cli(capsys, ["serve", "--model", "tiny", "--port", port])
    assert f"--port {port} is out of range (1-65535)" in line


def test_serve_checks_the_model_before_loading(capsys, tmp_path, no_model_load):
    with _listening_socket() as probe:
        free = probe.getsockname()[1]
    line = _cli(capsys, ["serve", "--model", str(tmp_path / "missing"), "--port", str(free)])
    assert "does not exist" in line


@pytest.mark.slow
@pytest.mark.parametrize("module", ["fastapi", "uvicorn"])
def test_serve_without_its_extra_names_the_extra(tmp_path, module):
    # As a user without the `serve` extra runs it: the module cannot be imported at all.
    script = (f"import sys; sys.modules[{module!r}] = None\n"
              "from selfrag_engine.entrypoints.cli import main\n"
              "sys.exit(main(['serve', '--model', 'tiny']))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line == (f"selfrag-engine: error: `selfrag-engine serve` needs {module}, which is not installed: "
                    "pip install 'selfrag-engine[serve]'")


def test_an_index_searched_with_another_encoder_is_refused_naming_both(capsys, tmp_path):
    pytest.importorskip("faiss")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n"
                              for p in read_corpus()[:50]), encoding="utf-8")
    index = tmp_path / "idx"
    assert main(["index", "build", "--passages", str(corpus), "--out", str(index), "--encoder", "hashing:384",
                 "--quiet"]) == 0
    # An index of MiniLM embeddings (384 dimensions, as hashing:384's): what retriever.json records is what
    # the refusal reads.
    meta = json.loads((index / "retriever.json").read_text())
    (index / "retriever.json").write_text(json.dumps({**meta, "encoder": "minilm"}))
    capsys.readouterr()
    line = _cli(capsys, ["index", "search", "--index", str(index), "--encoder", "hashing:384", "Who?"])
    assert "was built with encoder 'minilm'; searching it with 'hashing:384'" in line
    line = _cli(capsys, ["ask", "--model", "tiny", "--index", str(index), "--encoder", "hashing:384", "Who?",
                         "--quiet"])
    assert "'minilm'" in line and "'hashing:384'" in line


def _choice_options(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _choice_options(sub, prefix + (name,))
        elif action.choices is not None and action.option_strings:
            yield prefix, action


def test_every_choice_help_lists_is_accepted():
    """Each choice as `--help` prints it, typed back, parses to an accepted value."""
    checked = 0
    for command, action in _choice_options(build_parser()):
        for choice in action.choices:
            typed = str(choice)
            value = action.type(typed) if callable(action.type) else typed
            assert value in action.choices, (command, action.option_strings, typed)
            checked += 1
    assert checked > 10
    parser = build_parser()
    for spelled in ("none", "None", "fp8"):
        parser.parse_args(["generate", "--model", "tiny", "p", "--quantization", spelled])


def test_quantization_none_is_accepted_as_help_offers_it(capsys, tmp_path):
    assert main(["generate", "--model", "tiny", PROMPT, "--quantization", "None", "--max-tokens", "2",
                 "--quiet"]) == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    assert "{none,fp8}" in capsys.readouterr().out


@pytest.mark.slow
def test_index_without_faiss_names_the_retrieval_extra(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "1", "title": "T", "text": "some text"}) + "\n", encoding="utf-8")
    script = ("import sys; sys.modules['faiss'] = None\n"
              "from selfrag_engine.entrypoints.cli import main\n"
              f"sys.exit(main(['index', 'build', '--passages', {str(corpus)!r}, '--out', 'idx', '--encoder', "
              "'hashing:8', '--quiet']))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line == ("selfrag-engine: error: retrieval needs faiss, which is not installed: pip install "
                    "'selfrag-engine[retrieval]' (or 'selfrag-engine[retrieval-gpu]' for faiss's CUDA build)")
    assert not (tmp_path / "idx").exists()
