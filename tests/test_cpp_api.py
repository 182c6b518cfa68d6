"""The C++ API (csrc/include/selfrag_engine/engine.h): CMake builds the library, the example and the C++ tests
into build/cpp/ (as `make cpp` does), which then run over the embedded tiny model against the Python API: the
same generations and Self-RAG answers, alone and from 8 threads at once; cancellation and deadlines free
blocks; a bad model path is a CheckpointError. `build/cpp/ask` prints what `selfrag-engine ask` prints."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pybind11
import pytest

from selfrag_engine import Engine, SamplingParams
from selfrag_engine.entrypoints.cli import main
from selfrag_engine.selfrag.long_form import LongFormSelfRAG
from selfrag_engine.selfrag.scoring import ScoringConfig
from selfrag_engine.selfrag.short_form import SelfRAG
from selfrag_engine.tiny.assets import default_model_dir, read_corpus, read_examples

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "cpp"
MODEL = str(default_model_dir())
NDOCS = 3
LONG = (24, 3)  # the long form's max_new_tokens and max_depth

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("g++") is None, reason="needs cmake and g++"),
]


def _run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)


@pytest.fixture(scope="module")
def built() -> Path:
    """What `make cpp` builds, configured for this interpreter."""
    configure = _run(["cmake", "-S", str(ROOT / "csrc"), "-B", str(BUILD), f"-DPython_EXECUTABLE={sys.executable}"])
    assert configure.returncode == 0, configure.stdout + configure.stderr
    build = _run(["cmake", "--build", str(BUILD), "-j2"])
    assert build.returncode == 0, build.stdout + build.stderr
    return BUILD


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(MODEL, progress=False)


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _workload() -> list[tuple[str, list]]:
    """Questions of the tiny world with the passages about their subject first, and an instruction (which the
    model answers without retrieval) with the first passages of the corpus."""
    corpus = read_corpus()
    examples = read_examples()
    out = []
    for q in [e["question"] for e in examples["questions"][:2]]:
        about = [p for p in corpus if p.title in q]
        assert about, q
        out.append((q, (about + [p for p in corpus if p not in about])[:NDOCS]))
    out.append((examples["instructions"][0]["instruction"], corpus[:NDOCS]))
    return out


def _expectations(engine: Engine, path: Path) -> list[tuple[str, str]]:
    """The Python API's generations and answers, in the C++ test program's format; returns the answers."""
    lines, answers = [], []
    for prompt in ["Which country is Vanvrar in?", "Hey there!"]:
        out = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0))[0]
        lines.append(["generate", prompt, "12", " ".join(map(str, out.token_ids)), out.text, out.finish_reason])
    rag = SelfRAG(engine, scoring=ScoringConfig.paper(threshold=0.2), ndocs=NDOCS, max_new_tokens=100,
                  mode="adaptive", compat="paper")
    for question, passages in _workload():
        ans = rag.answer(question, passages)
        answers.append((question, ans.answer))
        lines.append(["answer", question, str(NDOCS), ",".join(p.id for p in passages), ans.answer,
                      "1" if ans.retrieved else "0", str(-1 if ans.best is None else ans.best),
                      " ".join(repr(float(b.final)) for b in ans.branches)])
    question, passages = _workload()[0]
    long = LongFormSelfRAG(engine, scoring=ScoringConfig.paper(threshold=0.2), ndocs=NDOCS, max_new_tokens=LONG[0],
                           max_depth=LONG[1], mode="always").answer(question, passages)
    assert long.segments  # (the tiny model writes one segment; several are streamed in the server's tests)
    lines.append(["long", question, str(NDOCS), ",".join(p.id for p in passages), str(LONG[0]), str(LONG[1]),
                  long.answer, "\x1f".join(s.text for s in long.segments)])
    path.write_text("".join("\t".join(_escape(f) for f in line) + "\n" for line in lines), encoding="utf-8")
    return answers


def test_cpp_tests_pass_against_the_python_api(built, engine, tmp_path):
    expected = tmp_path / "expected.tsv"
    answers = _expectations(engine, expected)
    assert any(a for _, a in answers)
    corpus = default_model_dir() / "corpus.jsonl"
    result = _run([str(built / "test_engine"), "--model", MODEL, "--passages", str(corpus),
                   "--expected", str(expected)])
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    counts = re.search(r"(\d+) passed, (\d+) failed\s*$", result.stdout)
    assert counts and counts.group(2) == "0", out
    assert f"expectations: 2 generations, {len(answers)} answers, 1 long-form answers" in result.stdout, out


def test_block_manager_builds_and_runs_without_python(built):
    result = _run([str(built / "test_block_manager_alone")], timeout=60)
    assert result.returncode == 0 and result.stdout.strip().endswith(" passed, 0 failed"), result.stdout
    link = (built / "CMakeFiles" / "test_block_manager_alone.dir" / "link.txt").read_text()
    assert "python" not in link.lower(), link


def test_cpp_ask_prints_what_the_ask_command_prints(built, tmp_path, capsys):
    question, passages = _workload()[0]
    path = tmp_path / "passages.jsonl"
    path.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in passages),
                    encoding="utf-8")
    # The C++ side names the embedded model as a user does from any directory; the Python side by its path.
    cpp = _run([str(built / "ask"), "--model", "tiny", "--passages", str(path), question], cwd=tmp_path)
    assert cpp.returncode == 0, cpp.stdout + cpp.stderr
    assert main(["ask", "--model", MODEL, "--passages", str(path), question, "--quiet"]) == 0
    python = capsys.readouterr().out

    def stable(text: str) -> list[str]:  # the time taken differs from run to run
        return [re.sub(r" in \d+\.\d\d s$", "", line) for line in text.rstrip("\n").split("\n")]

    assert stable(cpp.stdout) == stable(python)
    assert cpp.stdout.startswith("Answer: ") and "relevance" in cpp.stdout  # a branch table was printed


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="needs faiss")
def test_cpp_ask_with_an_index_prints_what_the_ask_command_prints(built, tmp_path, capsys):
    """The C++ engine's own retriever (EngineOptions::index): the same passages and answer as Python's."""
    question = _workload()[0][0]
    index = tmp_path / "index"
    assert main(["index", "build", "--passages", str(default_model_dir() / "corpus.jsonl"), "--out", str(index),
                 "--encoder", "hashing:128", "--quiet"]) == 0
    cpp = _run([str(built / "ask"), "--model", MODEL, "--index", str(index), question])
    assert cpp.returncode == 0, cpp.stdout + cpp.stderr
    capsys.readouterr()
    assert main(["ask", "--model", MODEL, "--index", str(index), question, "--quiet"]) == 0
    python = capsys.readouterr().out
    stable = [re.sub(r" in \d+\.\d\d s$", "", line) for line in python.rstrip("\n").split("\n")]
    assert [re.sub(r" in \d+\.\d\d s$", "", line) for line in cpp.stdout.rstrip("\n").split("\n")] == stable
    assert "relevance" in cpp.stdout  # retrieved: a branch table was printed


def test_cpp_ask_parses_its_options(built, tmp_path):
    """`ask --help` prints the usage and the options and exits 0; a mistake prints the usage and one line naming
    it and exits 2 (as argparse does for `selfrag-engine ask`), before any model loads."""
    for flag in ("--help", "-h"):
        result = _run([str(built / "ask"), flag], cwd=tmp_path)
        assert result.returncode == 0 and result.stderr == ""
        assert result.stdout.startswith("usage: ask [-h] --model MODEL")
        for option in ("--model MODEL", "--passages FILE", "--index DIR", "--device DEVICE"):
            assert option in result.stdout
    mistakes = {("What?",): "the following arguments are required: --model",
                ("--model", "tiny"): "the following arguments are required: question",
                ("--model", "tiny", "--bogus", "q"): "unrecognized argument: --bogus",
                ("--model",): "argument --model: expected one argument",
                ("--model", "tiny", "--passages", "p.jsonl", "--index", "idx", "q"):
                    "argument --passages: not allowed with argument --index"}
    for argv, message in mistakes.items():
        result = _run([str(built / "ask"), *argv], cwd=tmp_path)
        assert result.returncode == 2 and result.stdout == ""
        usage, error = result.stderr.splitlines()
        assert usage.startswith("usage: ask") and error == f"ask: error: {message}"


def test_cpp_ask_reports_a_named_error(built, tmp_path):
    result = _run([str(built / "ask"), "--model", str(tmp_path / "missing"), "--passages",
                   str(default_model_dir() / "corpus.jsonl"), "a question?"])
    assert result.returncode == 2
    assert re.match(r"error: (TokenizerError|CheckpointError): .*missing", result.stderr), result.stderr


def test_a_service_finds_the_package_with_find_package(tmp_path):
    cmake_dir = _run([sys.executable, "-m", "selfrag_engine.cmake_dir"], timeout=60)
    assert cmake_dir.returncode == 0, cmake_dir.stderr
    config = Path(cmake_dir.stdout.strip())
    assert (config / "selfrag_engineConfig.cmake").is_file()
    version = re.search(r'set\(PACKAGE_VERSION "([^"]+)"\)', (config / "selfrag_engineConfigVersion.cmake").read_text())
    pyproject = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert version and pyproject and version.group(1) == pyproject.group(1)

    app = tmp_path / "app"
    app.mkdir()
    (app / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(service CXX)\n"
        "find_package(selfrag_engine 0.1 CONFIG REQUIRED)\n"
        "add_executable(service service.cpp)\ntarget_link_libraries(service PRIVATE selfrag_engine::engine)\n"
        "add_executable(blocks blocks.cpp)\ntarget_link_libraries(blocks PRIVATE selfrag_engine::block_manager)\n")
    (app / "service.cpp").write_text('#include "selfrag_engine/engine.h"\n'
                                     'int main() { selfrag::Engine e("model"); return 0; }\n')
    (app / "blocks.cpp").write_text('#include "selfrag_engine/block_manager.h"\n'
                                    "int main() { selfrag::BlockManager bm(8, 4);\n"
                                    "  return bm.num_free_blocks() == 8 ? 0 : 1; }\n")
    build = tmp_path / "build"
    configure = _run(["cmake", "-S", str(app), "-B", str(build), f"-Dselfrag_engine_DIR={config}",
                      f"-DPython_EXECUTABLE={sys.executable}"])
    assert configure.returncode == 0, configure.stdout + configure.stderr
    # The block manager alone builds and runs; the engine target resolves (building it is `make cpp`'s job).
    blocks = _run(["cmake", "--build", str(build), "--target", "blocks"])
    assert blocks.returncode == 0, blocks.stdout + blocks.stderr
    assert _run([str(build / "blocks")], timeout=30).returncode == 0
    link = (build / "CMakeFiles" / "service.dir" / "link.txt").read_text()
    assert "libselfrag_engine.a" in link and "libpython" in link, link


def test_a_wheel_carries_the_cpp_api_and_finds_its_environment(tmp_path):
    """What setup.py puts in a wheel: the C++ sources in the package, whose config picks the environment's
    Python on its own."""
    prefix = tmp_path / "prefix"
    site = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    copied = _run([sys.executable, "setup.py", "-q", "build_py", "-d", str(site)], cwd=ROOT, timeout=300)
    assert copied.returncode == 0, copied.stderr
    (prefix / "bin").mkdir()
    (prefix / "bin" / "python3").symlink_to(sys.executable)
    printed = _run([sys.executable, "-m", "selfrag_engine.cmake_dir"], timeout=60, cwd=tmp_path,
                   env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert printed.returncode == 0, printed.stderr
    config = Path(printed.stdout.strip())
    assert config == site / "selfrag_engine" / "csrc" / "cmake"
    for header in ("engine.h", "block_manager.h"):
        assert (config.parent / "include" / "selfrag_engine" / header).is_file()

    app = tmp_path / "app"
    app.mkdir()
    (app / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.18)\nproject(service CXX)\n"
                                        "find_package(selfrag_engine CONFIG REQUIRED)\n")
    configure = _run(["cmake", "-S", str(app), "-B", str(tmp_path / "build"), f"-Dselfrag_engine_DIR={config}",
                      f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"])  # the stand-in environment has no pybind11
    assert configure.returncode == 0, configure.stdout + configure.stderr
    cache = (tmp_path / "build" / "CMakeCache.txt").read_text()
    assert f"Python_EXECUTABLE:FILEPATH={prefix / 'bin' / 'python3'}\n" in cache
