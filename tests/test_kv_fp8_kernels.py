"""The FP8 KV cache's kernels: e4m3 encoding with integer ops against torch's cast and the format's float64
definition."""
from __future__ import annotations

import torch

from selfrag_engine.kernels.e4m3 import quantize_e4m3
from tests.test_kv_fp8 import e4m3_round


def test_e4m3_encoding_equals_torch_cast_and_the_format_definition():
    g = torch.Generator().manual_seed(11)
    n = 4096
    x = torch.cat([torch.randn(n, generator=g) * s for s in (1e-3, 1e-2, 1.0, 100.0, 1000.0)])
    # Ties to even at both ends of the normal range, the largest subnormal, saturation, signed zeros.
    x[:10] = torch.tensor([1.0625, 1.1875, 3 * 2.0 ** -10, 2.0 ** -10, 464.0, -464.0, 0.0, -0.0, 7.5 * 2.0 ** -9,
                           -1e30])
    for scale in (1.0, 2.0 ** -3, 2.0 ** 4):
        got = quantize_e4m3(x, scale)
        assert torch.equal(got.view(torch.uint8), (x / scale).to(torch.float8_e4m3fn).view(torch.uint8))
        assert torch.equal(got.double(), e4m3_round(x.double() / scale))
    half = x.clamp(-60000, 60000).half()
    assert torch.equal(quantize_e4m3(half).view(torch.uint8), half.float().to(torch.float8_e4m3fn).view(torch.uint8))
