"""guidellm, a benchmarking client nobody here wrote, runs its completions and chat benchmarks against
`selfrag-engine serve` on the embedded model, as a user runs it: its command line, its default request bodies
(streamed, `stream_options` with usage, `ignore_eos`), synthetic prompts counted by the checkpoint's own tokenizer
(no hub). Each run is a handful of requests one after another, bounded by count (a duration bound only as a
backstop): no assertion depends on how fast the machine is."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("guidellm", reason="guidellm is a test dependency (requirements-clients.txt)")

from tests.server_process import MODEL, NAME, serve  # noqa: E402

pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="tiny_selfrag not present")

REQUESTS = 6
PROMPT_TOKENS, OUTPUT_TOKENS = 24, 8


@pytest.fixture(scope="module")
def server():
    with serve() as s:
        yield s


def benchmark(server, request_format: str, out: Path) -> dict:
    """One synchronous guidellm run of REQUESTS requests; its JSON report's benchmark."""
    report = out / "benchmarks.json"
    cmd = [sys.executable, "-m", "guidellm", "run",
           "--backend", f"kind=openai_http,target={server.base},model={NAME},request_format={request_format}",
           "--profile", "kind=synchronous",
           "--constraint", f"kind=max_requests,count={REQUESTS}",
           "--constraint", "kind=max_duration,seconds=300",
           "--tokenizer", f"kind=huggingface_auto,model={MODEL}",
           "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
           "--output", f"kind=json,path={report}",
           "--disable-console"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [bench] = json.loads(report.read_text())["benchmarks"]
    return bench


def check(bench: dict, endpoint: str) -> None:
    state = bench["scheduler_state"]
    requests = bench["requests"]
    errors = [r.get("info", {}).get("error") for r in requests["errored"]]
    assert state["errored_requests"] == 0 and not errors, errors[:2]
    assert state["successful_requests"] == REQUESTS and len(requests["successful"]) == REQUESTS
    for r in requests["successful"]:
        body = json.loads(r["request_args"])["body"]
        assert body["stream"] is True and body["ignore_eos"] is True
        assert r["response_id"].startswith("chatcmpl-" if endpoint == "chat" else "cmpl-")
        # ignore_eos: every request generates exactly the tokens asked for, counted by the server's usage
        assert r["output_tokens"] == OUTPUT_TOKENS
        assert r["prompt_tokens"] > 0
        assert r["output"]


def test_completions_benchmark(server, tmp_path):
    check(benchmark(server, "/v1/completions", tmp_path), "completions")


def test_chat_benchmark(server, tmp_path):
    check(benchmark(server, "/v1/chat/completions", tmp_path), "chat")
