"""`--kv-cache-dtype fp8` as users pass it: `selfrag-engine generate` run from another directory, and
`selfrag-engine serve` asked by the official `openai` client, whose /metrics report the pool's capacity."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from selfrag_engine import Engine, SamplingParams
from selfrag_engine.selfrag.prompts import format_prompt
from selfrag_engine.tiny.assets import default_model_dir

MODEL = default_model_dir()
pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="tiny_selfrag not present")
PROMPT = format_prompt("Where was Ada Lovelace born?")


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "selfrag_engine", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def fp8_engine():
    return Engine.from_pretrained(MODEL, progress=False, kv_cache_dtype="fp8")


def test_generate_command_with_fp8_kv(tmp_path, fp8_engine):
    run = _cli("generate", PROMPT, "--model", str(MODEL), "--kv-cache-dtype", "fp8", "--max-tokens", "12",
               "--temperature", "0", "--json", "--quiet", "--keep-special-tokens", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.splitlines()[0])
    want = fp8_engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0,
                                                        skip_special_tokens=False))[0]
    assert got["token_ids"] == want.token_ids


def test_generate_command_rejects_an_unknown_kv_cache_dtype(tmp_path):
    run = _cli("generate", "x", "--model", str(MODEL), "--kv-cache-dtype", "fp8_e5m2", cwd=tmp_path)
    assert run.returncode == 2 and "--kv-cache-dtype" in run.stderr and "fp8_e5m2" in run.stderr


def test_server_with_fp8_kv_answers_and_reports_its_pool(fp8_engine):
    openai = pytest.importorskip("openai", reason="the openai client is a test dependency of the server")
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi", reason="fastapi and uvicorn are the serve extra")
    from tests.server_process import serve

    with serve("--kv-cache-dtype", "fp8", model=MODEL) as server:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=12,
                                        temperature=0)
        want = fp8_engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0))[0]
        assert out.choices[0].text == want.text
        text = httpx.get(f"{server.base}/metrics", timeout=10).text
        capacity = re.search(r'^selfrag_kv_cache_capacity_tokens\{dtype="(\w+)"\} (\S+)$', text, re.M)
        assert capacity.group(1) == "float8_e4m3fn"
        # The same default budget as a float32 pool (the CPU's dtype) holds four times the tokens.
        stats = fp8_engine.cache_stats()
        assert float(capacity.group(2)) == stats["kv_capacity_tokens"]
        plain = Engine.from_pretrained(MODEL, progress=False, num_blocks=4)
        assert stats["kv_bytes_per_token"] * 4 == plain.cache_stats()["kv_bytes_per_token"]
        assert float(re.search(r"^selfrag_kv_cache_bytes (\S+)$", text, re.M).group(1)) == stats["kv_cache_bytes"]
