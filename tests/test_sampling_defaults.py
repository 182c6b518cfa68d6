"""One table of decoding defaults (engine/sampling_defaults.py): SamplingParams, the server's request bodies and
`selfrag-engine generate` read it, and `generate --help` prints each default."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from selfrag_engine import Engine, SamplingParams
from selfrag_engine.engine.sampling_defaults import SAMPLING_DEFAULTS, default
from selfrag_engine.entrypoints.cli import build_parser, main
from selfrag_engine.selfrag.prompts import format_prompt
from selfrag_engine.tiny.assets import default_model_dir

MODEL = default_model_dir()


def test_the_python_api_and_the_server_take_the_table():
    pytest.importorskip("fastapi", reason="fastapi is the serve extra")
    from selfrag_engine.entrypoints.openai.protocol import ChatBody, CompletionBody

    params = SamplingParams()
    for name in SAMPLING_DEFAULTS:
        assert getattr(params, name) == default(name), name
    completion = CompletionBody(prompt="x")
    chat = ChatBody(messages=[{"role": "user", "content": "x"}])
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                 "n", "skip_special_tokens", "seed"):
        assert getattr(completion, name) == getattr(chat, name) == default(name), name
    # vLLM's: 16 tokens for completions, the rest of the context for chat (None until the prompt is known).
    assert completion.max_tokens == default("max_tokens") == 16 and chat.max_tokens is None
    assert (default("temperature"), default("top_p")) == (1.0, 1.0)


def test_generate_help_prints_every_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "seed", "logprobs"):
        shown = "none" if default(name) is None else default(name)
        assert f"--{name.replace('_', '-')}" in text and f"(default: {shown})" in text, name
    args = build_parser().parse_args(["generate", "--model", "tiny", "p"])
    assert (args.max_tokens, args.temperature, args.repetition_penalty) == (16, 1.0, 1.0)


@pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="tiny_selfrag not present")
def test_generate_honours_a_penalty_as_the_python_api(capsys):
    prompt = format_prompt("Who wrote the letter?")
    assert main(["generate", "--model", str(MODEL), prompt, "--seed", "1", "--repetition-penalty", "1.8",
                 "--json", "--quiet"]) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[0])
    engine = Engine.from_pretrained(MODEL, progress=False)
    want = engine.generate(prompt, SamplingParams(seed=1, repetition_penalty=1.8))[0]
    assert got["token_ids"] == want.token_ids and len(want.token_ids) >= 1


# vLLM's (and OpenAI's) request defaults, written out: the reference the table is checked against.
VLLM_DEFAULTS = {"max_tokens": "16", "temperature": "1.0", "top_p": "1.0", "min_p": "0.0", "presence_penalty": "0.0",
                 "frequency_penalty": "0.0", "repetition_penalty": "1.0", "seed": "none", "n": "1"}


def test_serve_help_prints_the_request_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for name, value in VLLM_DEFAULTS.items():
        assert f"  {name} = {value}: " in text, name


def test_the_cpp_api_declares_the_table():
    """The C++ API's SamplingParams (engine.h) states its defaults in C++: each equals the table's."""
    header = Path(__file__).resolve().parents[1] / "csrc/include/selfrag_engine/engine.h"
    body = re.search(r"struct SamplingParams \{(.*?)\n\};", header.read_text(), re.S).group(1)
    declared = {name: {"true": True, "false": False}.get(v) if v in ("true", "false") else float(v)
                for name, v in re.findall(r"^\s*[\w:<>]+ (\w+) = ([^;]+);", body, re.M)}
    optional = set(re.findall(r"std::optional<[\w:]+> (\w+);", body))
    assert {"max_tokens", "temperature", "top_p", "top_k", "skip_special_tokens", "seed", "logprobs"} <= \
        set(declared) | optional
    for name in SAMPLING_DEFAULTS:
        if name in declared:
            assert declared[name] == default(name), name
        elif name in optional:
            assert default(name) is None, name
