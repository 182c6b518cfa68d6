"""The standalone forward equals Hugging Face's LlamaForCausalLM on the same checkpoint."""
import pytest
import torch

from selfrag_engine import Engine, SamplingParams
from tests.helpers import GPU_KV_CACHE_BYTES, hf_model, rel_err, tiny_checkpoint

CONFIGS = [
    dict(seed=1),
    dict(seed=2, num_key_value_heads=2),  # GQA
    dict(seed=3, hidden_size=96, intermediate_size=200, num_attention_heads=3, num_hidden_layers=3),  # odd sizes
    dict(seed=4, num_key_value_heads=1, tie_word_embeddings=True),
    dict(seed=5, rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=5000.0),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_score_equals_transformers_float32(cfg):
    path = tiny_checkpoint(**cfg)
    engine = Engine.from_pretrained(path, dtype=torch.float32, progress=False, max_num_batched_tokens=128)
    hf = hf_model(path)
    gen = torch.Generator().manual_seed(cfg["seed"])
    for length in (1, 2, 17, 130, 300):
        ids = torch.randint(3, engine.config.vocab_size, (length,), generator=gen)
        ids[0] = engine.tokenizer.bos_id
        ours = engine.score(ids.tolist())
        with torch.no_grad():
            ref = hf(ids[None]).logits[0].float()
        assert ours.shape == ref.shape == (length, engine.config.vocab_size)
        assert rel_err(ours, ref) < 1e-4, (length, rel_err(ours, ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm_is_transformers_to_the_bit(dtype):
    """The torch path's RMSNorm (one fused operator in float32, HF's own steps otherwise) and its residual form
    give Hugging Face's LlamaRMSNorm bit for bit, over widths and row counts a step has."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from selfrag_engine.models.llama import RMSNorm

    gen = torch.Generator().manual_seed(7)
    for width in (48, 256, 4096, 5120):
        ours, ref = RMSNorm(width, 1e-5).to(dtype), LlamaRMSNorm(width, eps=1e-5).to(dtype)
        with torch.no_grad():
            ours.weight.copy_(torch.randn(width, generator=gen) * 0.5 + 1)
            ref.weight.copy_(ours.weight)
            for rows, scale in ((1, 1.0), (5, 30.0), (130, 1e-3), (1000, 1.0)):
                x = (torch.randn(rows, width, generator=gen) * scale).to(dtype)
                r = torch.randn(rows, width, generator=gen).to(dtype)
                assert torch.equal(ours(x), ref(x)), (width, rows, scale)
                out, residual = ours(x, r)
                assert torch.equal(residual, x + r) and torch.equal(out, ref(x + r)), (width, rows, scale)


def test_score_equals_transformers_float16():
    path = tiny_checkpoint(seed=6, num_key_value_heads=2, torch_dtype=torch.float16)
    engine = Engine.from_pretrained(path, dtype=torch.float16, progress=False)
    hf = hf_model(path, torch.float16)
    ids = torch.randint(3, engine.config.vocab_size, (150,), generator=torch.Generator().manual_seed(0))
    ours = engine.score(ids.tolist())
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    assert rel_err(ours, ref) < 2e-2


def test_greedy_generation_equals_transformers_generate():
    path = tiny_checkpoint(seed=7, num_key_value_heads=2)
    engine = Engine.from_pretrained(path, dtype=torch.float32, progress=False)
    hf = hf_model(path)
    prompts = ["### Instruction:\nName a city.\n\n### Response:\n", "hello world", "12 + 7 ="]
    outs = engine.generate(prompts, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([engine.tokenizer.encode(prompt)])
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                              attention_mask=torch.ones_like(ids), pad_token_id=0)[0, ids.shape[1]:]
        assert out.token_ids == ref.tolist()
        assert out.finish_reason == "length"


def test_logprobs_equal_transformers():
    path = tiny_checkpoint(seed=8)
    engine = Engine.from_pretrained(path, dtype=torch.float32, progress=False)
    hf = hf_model(path)
    prompt = engine.tokenizer.encode("logprobs of a greedy run")
    out = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, logprobs=5, ignore_eos=True))[0]
    full = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(hf(full).logits[0].double(), -1)
    n = len(prompt)
    for step, tok in enumerate(out.token_ids):
        row = logp[n - 1 + step]
        assert abs(out.token_logprobs[step] - float(row[tok])) < 1e-4
        top = torch.topk(row, 5)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(out.logprobs[step][t] - v) < 1e-4
    assert abs(out.cumulative_logprob - sum(out.token_logprobs)) < 1e-6


def _kernel_vs_reference(device: str, dtype: torch.dtype, tol: float):
    path = tiny_checkpoint(seed=9, num_key_value_heads=2, torch_dtype=dtype)
    ref = Engine.from_pretrained(path, device=device, dtype=dtype, progress=False, use_kernels=False,
                                 kv_cache_bytes=GPU_KV_CACHE_BYTES)
    fast = Engine.from_pretrained(path, device=device, dtype=dtype, progress=False, use_kernels=True,
                                  kv_cache_bytes=GPU_KV_CACHE_BYTES)
    for cache in fast.kv_caches:
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))
    ids = torch.randint(3, ref.config.vocab_size, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    assert rel_err(fast.score(ids), ref.score(ids)) < tol
    prompts = ["kernel path", "a second, longer prompt for the ragged batch"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    a, b = fast.generate(prompts, params), ref.generate(prompts, params)
    for x, y in zip(a, b):
        agree = sum(s == t for s, t in zip(x.token_ids, y.token_ids))
        assert agree >= (len(y.token_ids) if dtype == torch.float32 else len(y.token_ids) - 2)


def test_model_with_kernels_equals_reference_interpreted():
    """The whole forward with the Triton kernels (run by the interpreter here) equals the torch path."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels in the Triton interpreter")
    _kernel_vs_reference("cpu", torch.float32, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_with_kernels_equals_reference_gpu(dtype):
    _kernel_vs_reference("cuda", dtype, 3e-2)
