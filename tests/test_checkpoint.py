"""Loading checkpoints: formats, lazy per-tensor reads, convert, and an error naming each problem."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfrag_engine.weights.convert import convert_bin_to_safetensors
from selfrag_engine.weights.loader import load_model
from selfrag_engine.config import LlamaConfig
from selfrag_engine.errors import CheckpointError
from tests.helpers import hf_model, rel_err, tiny_checkpoint


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _logits(path, **kw):
    from selfrag_engine import Engine
    engine = Engine.from_pretrained(path, progress=False, **kw)
    ids = torch.randint(3, engine.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    return engine.score(ids), ids


@pytest.mark.parametrize("opts", [dict(shards=3), dict(weight_format="bin"), dict(weight_format="bin", shards=2),
                                  dict(torch_dtype=torch.bfloat16)], ids=str)
def test_formats_load_and_match_transformers(opts):
    path = tiny_checkpoint(seed=11, **opts)
    ours, ids = _logits(path, dtype=torch.float32)
    with torch.no_grad():
        ref = hf_model(path, torch.float32)(torch.tensor([ids])).logits[0]
    assert rel_err(ours, ref) < 1e-4


def test_convert_bin_shards_to_safetensors(tmp_path):
    src = tiny_checkpoint(seed=12, weight_format="bin", shards=2)
    dst = convert_bin_to_safetensors(src, tmp_path / "st", progress=False)
    assert (dst / "model.safetensors.index.json").is_file()
    assert not list(dst.glob("*.bin"))
    assert (dst / "tokenizer.model").is_file() and (dst / "config.json").is_file()
    a, _ = _logits(src)
    b, _ = _logits(dst)
    assert torch.equal(a, b)


def test_convert_cli(tmp_path):
    from selfrag_engine.entrypoints.cli import main
    src = tiny_checkpoint(seed=12, weight_format="bin")
    assert main(["convert", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["convert", str(tiny_checkpoint(seed=12)), str(tmp_path / "x"), "--quiet"]) == 2


def test_old_rotary_inv_freq_tensors_are_ignored(tmp_path):
    path = _copy(tiny_checkpoint(seed=13), tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    save_file(tensors, path / "model.safetensors")
    load_model(path, progress=False)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json' is missing"):
        load_model(tmp_path / "empty", progress=False)


def test_malformed_config(tmp_path):
    path = _copy(tiny_checkpoint(seed=13), tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(path, progress=False)


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
                                   "num_attention_heads"])
def test_config_field_missing(tmp_path, field):
    path = _copy(tiny_checkpoint(seed=13), tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg[field]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"required field '{field}' is missing"):
        load_model(path, progress=False)


def test_config_values(tmp_path):
    cfg = json.loads((tiny_checkpoint(seed=13) / "config.json").read_text())
    with pytest.raises(CheckpointError, match="not divisible"):
        LlamaConfig.from_dict({**cfg, "hidden_size": 65})
    with pytest.raises(CheckpointError, match="rope_scaling type 'yarn'"):
        LlamaConfig.from_dict({**cfg, "rope_scaling": {"type": "yarn", "factor": 2.0}})
    with pytest.raises(CheckpointError, match="model_type 'mistral'"):
        LlamaConfig.from_dict({**cfg, "model_type": "mistral"})
    c = LlamaConfig.from_dict({**cfg, "rope_scaling": {"type": "linear", "factor": 4.0}, "num_key_value_heads": 2})
    assert c.rope_scaling_factor == 4.0 and c.num_key_value_heads == 2 and c.head_dim == cfg["hidden_size"] // 4


def test_config_of_transformers_5_reads_rope_parameters():
    """transformers 5 saves rope_parameters instead of rope_theta and rope_scaling: the same model either way."""
    cfg = json.loads((tiny_checkpoint(seed=13) / "config.json").read_text())
    old = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling")}
    for theta, scaling, new in (
            (5000.0, None, {"rope_theta": 5000.0, "rope_type": "default"}),
            (5000.0, {"type": "linear", "factor": 2.0},
             {"factor": 2.0, "rope_theta": 5000.0, "rope_type": "linear", "type": "linear"})):
        four = LlamaConfig.from_dict({**old, "rope_theta": theta, "rope_scaling": scaling})
        five = LlamaConfig.from_dict({**old, "rope_parameters": new})
        assert five == four and five.rope_theta == theta
        assert five.rope_scaling_factor == (scaling["factor"] if scaling else 1.0)
    with pytest.raises(CheckpointError, match="rope_scaling type 'yarn'"):
        LlamaConfig.from_dict({**old, "rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(CheckpointError, match="rope_parameters must be an object"):
        LlamaConfig.from_dict({**old, "rope_parameters": [10000.0]})


def test_no_weights(tmp_path):
    path = _copy(tiny_checkpoint(seed=13), tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(path, progress=False)


def test_missing_tensor(tmp_path):
    path = _copy(tiny_checkpoint(seed=13), tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model.layers.1.mlp.down_proj.weight"):
        load_model(path, progress=False)


def test_unexpected_tensor(tmp_path):
    path = _copy(tiny_checkpoint(seed=13), tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.randn(64)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        load_model(path, progress=False)


def test_wrong_shape(tmp_path):
    path = _copy(tiny_checkpoint(seed=13), tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = torch.randn(63)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(63,\), the model expects \(64,\)"):
        load_model(path, progress=False)


def test_wrong_dtype(tmp_path):
    path = _copy(tiny_checkpoint(seed=13), tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = torch.randint(0, 5, (64,), dtype=torch.int32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="'model.norm.weight' has dtype torch.int32"):
        load_model(path, progress=False)


def test_truncated_safetensors(tmp_path):
    path = _copy(tiny_checkpoint(seed=13), tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_model(path, progress=False)


def test_garbage_safetensors(tmp_path):
    path = _copy(tiny_checkpoint(seed=13), tmp_path)
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_model(path, progress=False)


def test_truncated_bin(tmp_path):
    path = _copy(tiny_checkpoint(seed=14, weight_format="bin"), tmp_path)
    data = (path / "pytorch_model.bin").read_bytes()
    (path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_model(path, progress=False)


def test_missing_shard(tmp_path):
    path = _copy(tiny_checkpoint(seed=15, shards=2), tmp_path)
    next(path.glob("model-00002-of-00002.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard files that are missing"):
        load_model(path, progress=False)


def test_malformed_index(tmp_path):
    path = _copy(tiny_checkpoint(seed=15, shards=2), tmp_path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        load_model(path, progress=False)


def test_unknown_quantization_scheme(tmp_path):
    path = _copy(tiny_checkpoint(seed=13), tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="awq"):
        load_model(path, progress=False)


def test_weights_load_straight_to_target_dtype():
    model = load_model(tiny_checkpoint(seed=13), dtype=torch.float16, progress=False)
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.float16}
    assert model.rope_cos.dtype == torch.float32
