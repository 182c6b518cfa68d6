"""What the end-to-end benchmarks run on: a Llama-2-shaped model with random weights made on the device (no
download), a small Self-RAG tokenizer, and a Hugging Face `LlamaForCausalLM` that shares the same weights.

Random weights decode as fast as trained ones (every step reads every weight); the benchmarks force the
number of generated tokens with ignore_eos so no run ends early.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from selfrag_engine.config import LlamaConfig
from selfrag_engine.models.llama import Llama
from selfrag_engine.testing import tiny_config, write_tokenizer
from selfrag_engine.tokenizer import Tokenizer

# selfrag/selfrag_llama2_7b's config.json (docs/SELFRAG.md), as transformers writes it.
LLAMA2_7B = tiny_config(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, max_position_embeddings=4096, vocab_size=32016,
                        torch_dtype="bfloat16")
# The same shape of model, small enough for the Triton interpreter on a CPU (the smoke mode CI runs).
SMOKE = tiny_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=1024, vocab_size=512)


def random_llama(cfg: dict, device: str, dtype: torch.dtype, seed: int = 0, fp8: bool = False) -> Llama:
    """A Llama with N(0, 0.02) weights drawn on `device` (norm weights near 1); with fp8 the decoder linears
    are quantized per channel as when loading with quantization="fp8"."""
    config = LlamaConfig.from_dict(cfg)
    with torch.device("meta"):
        model = Llama(config)
    model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32))
    model.init_rope()
    if fp8:
        from selfrag_engine.layers.fp8_linear import replace_linears_with_fp8
        replace_linears_with_fp8(model, quantize_existing=True)
    return model.eval().requires_grad_(False)


def weight_bytes_per_token(model: Llama) -> int:
    """Bytes a decode step must read from the weights: every parameter and buffer but the embedding table
    (one row per token) and the rope tables (a row per position)."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    embed = model.model.embed_tokens.weight
    return total - embed.numel() * embed.element_size()


def kv_bytes_per_token(cfg: dict, dtype: torch.dtype) -> int:
    """K and V bytes of one cached token, all layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * elem


def bench_tokenizer(cfg: dict) -> Tokenizer:
    """A SentencePiece tokenizer of exactly the model's vocabulary, the 16 Self-RAG tokens last as in the
    published checkpoint (a small trained model padded with unused pieces), so every id a random model
    samples decodes."""
    with tempfile.TemporaryDirectory(prefix="selfrag-bench-tok-") as tmp:
        write_tokenizer(Path(tmp), vocab_pieces=320, pad_to=cfg["vocab_size"] - 16)
        return Tokenizer.from_pretrained(Path(tmp))


def hf_sharing_weights(model: Llama, cfg: dict):
    """A transformers LlamaForCausalLM whose parameters are `model`'s own tensors (no second copy).
    Needs a model that is not FP8-quantized. Works with transformers 4.x and 5.x."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hf_cfg = HFConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(model.state_dict(), strict=True, assign=True)
    device = model.rope_cos.device
    # The rotary embeddings' inv_freq buffers are not in the state dict and stayed on meta. Each is built again
    # from its config off the meta device, by the module's own constructor: how it computes inv_freq differs
    # between transformers versions (4.x keeps a rope_init_fn, 5.x a compute_default_rope_parameters).
    for name, module in list(hf.named_modules()):
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and module.inv_freq.is_meta:
            parent_name, _, attr = name.rpartition(".")
            with torch.device("cpu"):
                fresh = type(module)(config=module.config)
            setattr(hf.get_submodule(parent_name) if parent_name else hf, attr, fresh)
    return hf.to(device).eval()
