"""What a lent GPU machine's session rests on, checked on the CPU: transformers' automatic compilation off in
every benchmark's `generate`, results written as they are measured, and the plan of `bench/gpu_session.sh`
(two calls, each inside its own estimate; everything under $OUT in at most 8 files, the archive at the top).
"""
from __future__ import annotations

import json
import types

import pytest
import torch

from bench import common


def _auto_compile_decision(generate_kwargs: dict) -> bool:
    """transformers' own decision whether `generate` compiles the forward, for a model on CUDA with a static
    (compileable) cache, asked with the generation config that `generate_kwargs` make."""
    transformers = pytest.importorskip("transformers")
    from transformers.cache_utils import Cache

    class CompileableCache(Cache):
        is_compileable = True

        def __init__(self):  # no layers needed: only its type and flag are looked at
            pass

    config = transformers.GenerationConfig(**generate_kwargs)
    # transformers 5 also reads the model's config (flash attention or not) once it would compile.
    on_cuda = types.SimpleNamespace(device=torch.device("cuda"), config=transformers.LlamaConfig())
    decide = getattr(transformers.LlamaForCausalLM, "_valid_auto_compile_criteria", None)
    if decide is None:
        pytest.skip(f"transformers {transformers.__version__} decides its automatic compile elsewhere")
    return decide(on_cuda, {"past_key_values": CompileableCache()}, config)


def test_benchmarks_turn_transformers_auto_compile_off():
    # The fake reaches transformers' criteria: without the flag, a CUDA model with a static cache compiles.
    assert _auto_compile_decision({}) is True
    assert _auto_compile_decision(dict(common.HF_GENERATE_KWARGS)) is False


def test_hf_generate_passes_the_flag_to_generate():
    seen = {}

    class FakeModel:
        def generate(self, **kwargs):
            seen.update(kwargs)
            return "out"

    assert common.hf_generate(FakeModel(), max_new_tokens=3) == "out"
    assert seen == {"disable_compile": True, "max_new_tokens": 3}


def test_autosave_writes_each_row_as_it_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_autosave", None)
    results: list[dict] = []
    other: list[dict] = []
    common.autosave("decode", "cpu", results, tmp_path)
    common.record(other, "not_saved", 1.0, "x")  # another list: not this benchmark's rows
    assert not list(tmp_path.glob("*.json"))
    common.record(results, "decode_fp8_bs1_tokens_per_s", 123.5, "tokens/s", batch=1)
    (path,) = tmp_path.glob("decode-cpu-*.json")
    assert [r["metric"] for r in json.loads(path.read_text())["results"]] == ["decode_fp8_bs1_tokens_per_s"]
    common.record(results, "decode_fp8_bs1_floor_fraction", 0.5, "fraction", batch=1)
    doc = json.loads(path.read_text())
    assert [r["value"] for r in doc["results"]] == [123.5, 0.5]
    assert "decode_fp8_bs1_floor_fraction" in path.with_suffix(".md").read_text()
    assert not list(tmp_path.glob("*.tmp"))
