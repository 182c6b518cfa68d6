"""Fused q|k|v and gate|up linears: each checkpoint tensor lands in its rows bit for bit (fp32 and FP8, per-channel
and per-tensor scales), state_dict keeps the Hugging Face names, and errors name the checkpoint tensor."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfrag_engine.backend import TORCH, TRITON_INTERPRETED
from selfrag_engine.config import LlamaConfig
from selfrag_engine.errors import CheckpointError
from selfrag_engine.layers.fp8_linear import FP8_DTYPE, FP8_MAX, Fp8Linear, quantize_fp8_per_channel
from selfrag_engine.models.llama import MLP
from selfrag_engine.tiny.train import ModelShape, hf_config, new_model, save_checkpoint
from selfrag_engine.weights.loader import load_model
from selfrag_engine.weights.quantize import DECODER_LINEAR, quantize_checkpoint
from tests.helpers import tiny_checkpoint

GQA = {"seed": 21, "num_key_value_heads": 2}
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _fused(model, layer: int):
    block = model.model.layers[layer]
    return block.self_attn.qkv_proj, block.mlp.gate_up_proj


def test_fused_weights_are_the_checkpoint_shards_bit_for_bit_fp32():
    path = tiny_checkpoint(**GQA)
    tensors = load_file(path / "model.safetensors")
    model = load_model(path, dtype=torch.float32, progress=False)
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv, gate_up = _fused(model, i)
        ref_qkv = torch.cat([tensors[f"{p}self_attn.{n}.weight"] for n in QKV])
        ref_gate_up = torch.cat([tensors[f"{p}mlp.{n}.weight"] for n in GATE_UP])
        kv_rows = cfg.num_key_value_heads * cfg.head_dim
        assert qkv.weight.shape == (cfg.hidden_size + 2 * kv_rows, cfg.hidden_size)
        assert torch.equal(qkv.weight, ref_qkv)
        assert torch.equal(gate_up.weight, ref_gate_up)
        assert torch.equal(model.model.layers[i].self_attn.o_proj.weight, tensors[f"{p}self_attn.o_proj.weight"])
        assert torch.equal(model.model.layers[i].mlp.down_proj.weight, tensors[f"{p}mlp.down_proj.weight"])


def test_state_dict_keeps_checkpoint_names_and_round_trips():
    path = tiny_checkpoint(**GQA)
    tensors = load_file(path / "model.safetensors")
    model = load_model(path, dtype=torch.float32, progress=False)
    state = model.state_dict()
    assert set(state) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(state[name], t), name
    # Hugging Face's order within a layer: q, k, v, o, then gate, up, down.
    layer0 = [k.removeprefix("model.layers.0.") for k in state if k.startswith("model.layers.0.")]
    assert layer0 == ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                      "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                      "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    other = load_model(tiny_checkpoint(seed=22, num_key_value_heads=2), dtype=torch.float32, progress=False)
    assert not torch.equal(_fused(other, 0)[0].weight, _fused(model, 0)[0].weight)
    other.load_state_dict({k: v.clone() for k, v in tensors.items()}, strict=True)
    for i in range(model.config.num_hidden_layers):
        for a, b in zip(_fused(other, i), _fused(model, i)):
            assert torch.equal(a.weight, b.weight)


def test_fp8_quantize_on_load_is_per_shard_per_channel():
    """Per-channel scales are per row, so quantizing the fused weight's shards one by one equals quantizing
    each checkpoint tensor alone, concatenated."""
    path = tiny_checkpoint(**GQA)
    tensors = load_file(path / "model.safetensors")
    model = load_model(path, dtype=torch.float32, quantization="fp8", progress=False)
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        for fused, names in zip(_fused(model, i), ([f"self_attn.{n}" for n in QKV], [f"mlp.{n}" for n in GATE_UP])):
            assert isinstance(fused, Fp8Linear)
            parts = [quantize_fp8_per_channel(tensors[f"{p}{n}.weight"]) for n in names]
            assert torch.equal(fused.weight.view(torch.uint8), torch.cat([q for q, _ in parts]).view(torch.uint8))
            assert torch.equal(fused.weight_scale, torch.cat([s for _, s in parts]))


def test_fp8_prequantized_per_channel_loads_like_quantize_on_load(tmp_path):
    src = tiny_checkpoint(**GQA)
    quantize_checkpoint(src, tmp_path / "fp8", progress=False)
    on_load = load_model(src, dtype=torch.float32, quantization="fp8", progress=False)
    prequant = load_model(tmp_path / "fp8", dtype=torch.float32, progress=False)
    for i in range(on_load.config.num_hidden_layers):
        for a, b in zip(_fused(on_load, i), _fused(prequant, i)):
            assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8))
            assert torch.equal(a.weight_scale, b.weight_scale)
    ids = torch.randint(3, on_load.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(on_load.forward_dense(ids), prequant.forward_dense(ids))


def _per_tensor_checkpoint(src, dst):
    """An FP8 checkpoint as Hugging Face's `quant_method: fp8` writes it: one scalar scale per tensor."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, dst / f.name)
    tensors = load_file(src / "model.safetensors")
    out, scales = {}, {}
    for name, t in tensors.items():
        if DECODER_LINEAR.match(name):
            s = t.abs().amax() / FP8_MAX
            out[name] = (t / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            out[name.removesuffix("weight") + "weight_scale"] = s.reshape(())
            scales[name] = s
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (dst / "config.json").write_text(json.dumps(cfg))
    return out, scales


def test_fp8_prequantized_per_tensor_scales_expand_per_channel(tmp_path):
    written, scales = _per_tensor_checkpoint(tiny_checkpoint(**GQA), tmp_path / "pt")
    model = load_model(tmp_path / "pt", dtype=torch.float32, progress=False)
    cfg = model.config
    x = torch.randn(3, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for fused, names in zip(_fused(model, i), ([f"self_attn.{n}" for n in QKV], [f"mlp.{n}" for n in GATE_UP])):
            keys = [f"{p}{n}.weight" for n in names]
            assert len({float(scales[k]) for k in keys}) == len(keys)  # the shards' scales differ
            assert torch.equal(fused.weight.view(torch.uint8), torch.cat([written[k] for k in keys]).view(torch.uint8))
            expanded = torch.cat([scales[k].float().expand(written[k].shape[0]) for k in keys])
            assert torch.equal(fused.weight_scale, expanded)
            # The fused GEMV computes what each checkpoint tensor dequantized with its own scale gives.
            ref = torch.cat([x.double() @ (written[k].double() * scales[k].double()).T for k in keys], dim=1)
            with torch.no_grad():
                torch.testing.assert_close(fused(x).double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight",
                                  "model.layers.1.self_attn.o_proj.weight"])
def test_missing_shard_names_the_checkpoint_tensor(tmp_path, name):
    path = _copy(tiny_checkpoint(**GQA), tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors[name]
    save_file(tensors, path / "model.safetensors")
    for quantization in (None, "fp8"):
        with pytest.raises(CheckpointError, match=rf"missing 1 tensor\(s\): {name}$"):
            load_model(path, quantization=quantization, progress=False)


def test_missing_per_tensor_scale_names_the_checkpoint_tensor(tmp_path):
    _per_tensor_checkpoint(tiny_checkpoint(**GQA), tmp_path / "pt")
    tensors = load_file(tmp_path / "pt" / "model.safetensors")
    del tensors["model.layers.0.self_attn.v_proj.weight_scale"]
    save_file(tensors, str(tmp_path / "pt" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model.layers.0.self_attn.v_proj.weight_scale$"):
        load_model(tmp_path / "pt", progress=False)


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_misshapen_shard_names_the_checkpoint_tensor(tmp_path, quantization):
    path = _copy(tiny_checkpoint(**GQA), tmp_path)
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    rows, cols = tensors[name].shape
    tensors[name] = torch.randn(rows + 16, cols)  # as many rows as q: a checkpoint without GQA
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \({rows + 16}, {cols}\)"):
        load_model(path, quantization=quantization, progress=False)


def test_misshapen_prequantized_scale_names_the_checkpoint_tensor(tmp_path):
    _per_tensor_checkpoint(tiny_checkpoint(**GQA), tmp_path / "pt")
    tensors = load_file(tmp_path / "pt" / "model.safetensors")
    name = "model.layers.0.mlp.gate_proj.weight_scale"
    tensors[name] = torch.ones(3)
    save_file(tensors, str(tmp_path / "pt" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \(3,\)"):
        load_model(tmp_path / "pt", progress=False)


def test_mlp_kernel_and_torch_paths_agree():
    """silu_and_mul on the fused gate|up output (the interpreter here) equals F.silu(gate) * up."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernel in the Triton interpreter")
    cfg = LlamaConfig.from_dict({"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64,
                                 "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "model_type": "llama"})
    torch.manual_seed(0)
    mlp = MLP(cfg).requires_grad_(False)
    x = torch.randn(5, 32)
    gate_up = mlp.gate_up_proj(x)
    gate, up = gate_up[:, :48].double(), gate_up[:, 48:].double()
    ref = mlp.down_proj((gate * torch.sigmoid(gate) * up).float())
    mlp.backend = TORCH
    torch_out = mlp(x)
    mlp.backend = TRITON_INTERPRETED
    kernel_out = mlp(x)
    torch.testing.assert_close(torch_out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kernel_out, ref, rtol=1e-5, atol=1e-6)


def test_saved_trained_model_has_checkpoint_names(tmp_path):
    shape = ModelShape(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    config = hf_config(shape, 96)
    model = new_model(LlamaConfig.from_dict(config), seed=3)
    save_checkpoint(model, tmp_path, config)
    saved = load_file(tmp_path / "model.safetensors")
    p = "model.layers.1."
    assert {p + f"self_attn.{n}.weight" for n in (*QKV, "o_proj")} | {p + f"mlp.{n}.weight" for n in
                                                                      (*GATE_UP, "down_proj")} <= set(saved)
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in saved)
    qkv, gate_up = _fused(model, 1)
    assert torch.equal(torch.cat([saved[p + f"self_attn.{n}.weight"] for n in QKV]), qkv.weight)
    assert torch.equal(torch.cat([saved[p + f"mlp.{n}.weight"] for n in GATE_UP]), gate_up.weight)
    loaded = load_model(tmp_path, dtype=torch.float32, progress=False)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded.forward_dense(ids), model.forward_dense(ids))
