"""The launch counter: Triton launches and kernel-running torch ops per decoder layer per decode step, counted on
the CPU through the Triton interpreter, and the fused layer's budget of launches."""
import os

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from selfrag_engine import Engine, SamplingParams
from selfrag_engine.engine.launch_counter import LaunchCounter
from selfrag_engine.kernels.activation import silu_and_mul
from tests.helpers import tiny_checkpoint

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="counts the kernels the Triton interpreter runs")

PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def _engine(**kw) -> Engine:
    return Engine.from_pretrained(tiny_checkpoint(seed=31, num_key_value_heads=2, num_hidden_layers=3),
                                  dtype=torch.float32, progress=False, **kw)


# Per layer and decode step. float32 linears (one aten GEMM each) keep their norms apart: norm, q|k|v, rotary + KV
# store, attention, o, norm + residual, gate|up, SiLU-and-mul, down. FP8 linears take each norm, and the
# SiLU-and-mul, as the prologue of the GEMV after it: norm + q|k|v, rotary + KV store, attention, o,
# norm + residual + gate|up, SiLU-and-mul + down.
DECODE_LAYER = {
    None: ({"_rms_norm_kernel": 2.0, "aten.linear": 4.0, "_rotary_store_kernel": 1.0, "_decode_kernel": 1.0,
            "_silu_and_mul_kernel": 1.0}, 9.0),
    "fp8": ({"_fp8_norm_gemv_kernel": 2.0, "_fp8_gemv_kernel": 1.0, "_fp8_silu_gemv_kernel": 1.0,
             "_rotary_store_kernel": 1.0, "_decode_kernel": 1.0}, 6.0),
}


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_fused_decode_layer_launches(quantization):
    engine = _engine(use_kernels=True, quantization=quantization)
    with LaunchCounter(engine.model) as counter:
        engine.generate(["one prompt", "and a second, longer one"], PARAMS)
    # Two prompts, max_tokens 4: one prefill that samples the first token, then three decode steps.
    assert counter.decode_steps() == 3
    kernels, total = DECODE_LAYER[quantization]
    assert dict(counter.per_layer(decode=True)) == kernels
    assert counter.decode_launches_per_layer() == total
    if quantization == "fp8":
        assert total <= 7.0  # the per-layer budget of the FP8 decode step
    assert counter.host_reads(decode=True) == 0
    # Outside the layers: the embedding and the final norm, once per step.
    outside = [l.name for l in counter.launches if l.layer is None and l.decode]
    assert sorted(outside) == sorted(["aten.embedding", "_rms_norm_kernel"] * 3)


def test_torch_path_counts_every_operator():
    """Without kernels each layer runs its torch ops: more launches, and no Triton kernel at all."""
    engine = _engine(use_kernels=False)
    with LaunchCounter(engine.model) as counter:
        engine.generate(["one prompt"], PARAMS)
    per_layer = counter.per_layer(decode=True)
    assert not any(name.startswith("_") for name in per_layer)
    assert per_layer["aten.linear"] == 4.0 and per_layer["aten.silu"] == 1.0 and per_layer["aten.mul"] >= 1.0
    assert counter.decode_launches_per_layer() > 9.0


def test_counts_launches_not_views_allocations_or_the_interpreters_copies():
    engine = _engine(use_kernels=True)
    layer = engine.model.model.layers[0]
    x = torch.randn(3, 2 * 8, generator=torch.Generator().manual_seed(0))
    original_runs = (JITFunction.run, InterpretedFunction.run)

    def probe(module, args, output):
        h = x.view(3, 2, 8).transpose(0, 1)  # views: no launch
        torch.empty(4)  # an allocation: no launch
        out = silu_and_mul(x)  # one Triton launch (its torch.empty and the interpreter's copies: none)
        out.add_(1.0)  # one torch kernel
        h.sum().item()  # one kernel and a host read
        return output

    handle = layer.register_forward_hook(probe)
    try:
        with LaunchCounter(engine.model) as counter:
            engine.generate(["one prompt"], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    finally:
        handle.remove()
    assert (JITFunction.run, InterpretedFunction.run) == original_runs
    layer0 = [l for l in counter.launches if l.layer == 0 and l.decode]
    assert [l.name for l in layer0][-4:] == ["_silu_and_mul_kernel", "aten.add_", "aten.sum", "aten.item"]
    assert [l.kind for l in layer0][-4:] == ["triton", "torch", "torch", "host_read"]
    # Layer 0's nine launches, the probe's three kernels, its host read not among the launches.
    assert counter.per_layer(decode=True)["_silu_and_mul_kernel"] == pytest.approx(1 + 1 / 3)
    assert sum(1 for l in layer0 if l.kind != "host_read") == 9 + 3
    assert counter.host_reads(decode=True) == 1
