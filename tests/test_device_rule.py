"""One device rule for every command and the API: "auto" is CUDA when there is one, else the CPU, with the
dtype that fits the device, and a one-line notice when a large model lands on the CPU."""
from __future__ import annotations

import inspect
import logging

import pytest
import torch

from selfrag_engine import Engine
from selfrag_engine.backend import device_of
from selfrag_engine.config import LlamaConfig
from selfrag_engine.entrypoints.cli import build_parser
from selfrag_engine.errors import DeviceError
from selfrag_engine.hub import embedded_model_dir
from selfrag_engine.weights import loader
from selfrag_engine.weights.loader import auto_dtype, large_on_cpu_notice, parameter_count

# selfrag/selfrag_llama2_7b's config.json, the fields the engine reads.
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
             "rope_theta": 10000.0, "max_position_embeddings": 4096, "vocab_size": 32016,
             "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def test_auto_is_cuda_when_present_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_of("auto") == device_of(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_of("auto") == torch.device("cuda")
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        device_of("gpu")


def test_the_dtype_that_fits_the_device():
    for checkpoint in (torch.bfloat16, torch.float16, torch.float32):
        assert auto_dtype(checkpoint, "cpu", bf16_supported=True) == torch.float32
    assert auto_dtype(torch.bfloat16, "cuda", bf16_supported=True) == torch.bfloat16
    assert auto_dtype(torch.bfloat16, "cuda", bf16_supported=False) == torch.float16
    assert auto_dtype(torch.float16, "cuda", bf16_supported=True) == torch.float16


def test_parameter_count_is_llama2_7b_and_matches_the_model_built():
    config = LlamaConfig.from_dict(LLAMA2_7B)
    assert parameter_count(config) == 6_738_546_688  # Llama-2-7B's 6,738,415,616 + 16 added tokens x 4096 x 2
    engine = Engine.from_pretrained("tiny", device="cpu", progress=False)
    built = sum(p.numel() for p in engine.model.parameters())
    assert parameter_count(engine.config) == built


def test_a_large_model_on_the_cpu_gets_one_line():
    config = LlamaConfig.from_dict(LLAMA2_7B)
    notice = large_on_cpu_notice(config, torch.float32, torch.device("cpu"))
    assert notice is not None and "\n" not in notice
    assert "6.7B-parameter model on the CPU in float32 (~27 GB" in notice
    assert large_on_cpu_notice(config, torch.bfloat16, torch.device("cuda")) is None
    tiny = Engine.from_pretrained("tiny", device="cpu", progress=False).config
    assert large_on_cpu_notice(tiny, torch.float32, torch.device("cpu")) is None


def test_loading_on_the_cpu_logs_the_notice_once(monkeypatch, caplog):
    monkeypatch.setattr(loader, "LARGE_ON_CPU_PARAMETERS", 1)
    with caplog.at_level(logging.WARNING, logger="selfrag_engine"):
        Engine.from_pretrained(embedded_model_dir(), progress=False)
    notes = [r.getMessage() for r in caplog.records if "on the CPU" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith("selfrag-engine: note: loading a 0.0B-parameter model")


def test_every_command_defaults_to_auto():
    parser = build_parser()
    for argv in (["generate", "--model", "tiny", "p"], ["ask", "--model", "tiny", "q"],
                 ["eval", "--model", "tiny", "--task", "popqa", "--input", "x"], ["serve", "--model", "tiny"],
                 ["index", "build", "--passages", "x", "--out", "y"], ["index", "search", "--index", "x", "q"]):
        assert parser.parse_args(argv).device == "auto", argv
    from selfrag_engine.entrypoints.demo import build_parser as demo_parser
    assert demo_parser().parse_args([]).device == "auto"
    assert inspect.signature(Engine.from_pretrained).parameters["device"].default == "auto"


@pytest.mark.slow
def test_the_command_line_prints_the_notice_as_one_line(tmp_path):
    """What a user of `generate` sees on stderr when the model is large for the CPU (the threshold lowered so
    the tiny model counts as large): one line, then the answer."""
    import subprocess
    import sys

    script = ("import sys\n"
              "import selfrag_engine.weights.loader as loader\n"
              "loader.LARGE_ON_CPU_PARAMETERS = 1\n"
              "from selfrag_engine.entrypoints.cli import main\n"
              "sys.exit(main(['generate', '--model', 'tiny', '--device', 'cpu', 'Name a color.', '--max-tokens', "
              "'2', '--quiet']))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("selfrag-engine: note: loading a 0.0B-parameter model on the CPU in float32")
