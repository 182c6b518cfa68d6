"""The tiny checkpoints written by `selfrag_engine.testing` load in transformers and are reproducible."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfrag_engine import testing
from selfrag_engine.vocab import ADDED_TOKENS as SELFRAG_ADDED_TOKENS
from selfrag_engine.testing import (random_state_dict, tiny_config, train_sentencepiece,
                                    write_tiny_checkpoint, write_tokenizer)
from selfrag_engine.tokenizer import Tokenizer
from tests.helpers import hf_rope, slow_llama_tokenizer

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "single": {},
    "sharded": {"shards": 3},
    "bin": {"weight_format": "bin"},
    "bin_sharded": {"weight_format": "bin", "shards": 2},
    "tied": {"tie_word_embeddings": True},
    "gqa_rope_scaled": {"num_key_value_heads": 2, "rope_scaling": {"type": "linear", "factor": 2.0},
                        "num_hidden_layers": 3},
    "bf16": {"torch_dtype": torch.bfloat16},
    "hf_init": {"init_std": 0.02},
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    return {name: write_tiny_checkpoint(root / name, seed=3, **opts) for name, opts in VARIANTS.items()}


def _load_hf(path: Path):
    model, info = transformers.LlamaForCausalLM.from_pretrained(
        path, dtype="auto", attn_implementation="eager", output_loading_info=True)
    return model.eval(), info


def _files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_loads_in_transformers(checkpoints, name):
    path, opts = checkpoints[name], VARIANTS[name]
    model, info = _load_hf(path)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    cfg = json.loads((path / "config.json").read_text())
    hf_cfg = model.config
    assert hf_cfg.num_key_value_heads == opts.get("num_key_value_heads", 4)
    assert hf_cfg.num_hidden_layers == opts.get("num_hidden_layers", 2)
    assert hf_cfg.tie_word_embeddings == opts.get("tie_word_embeddings", False)
    theta, hf_scaling = hf_rope(hf_cfg)
    assert theta == cfg["rope_theta"]
    scaling = opts.get("rope_scaling")
    if scaling is None:
        assert hf_scaling is None
    else:  # transformers adds its own "rope_type" key
        assert scaling.items() <= hf_scaling.items()
    dtype = opts.get("torch_dtype", torch.float32)
    assert model.dtype == dtype and cfg["torch_dtype"] == str(dtype).removeprefix("torch.")

    # The weights transformers holds are the generated ones, under the same names.
    expected = random_state_dict(cfg, seed=3, init_std=opts.get("init_std"))
    state = model.state_dict()
    if cfg["tie_word_embeddings"]:
        assert "lm_head.weight" not in expected
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v.to(dtype)), k

    ours = Tokenizer.from_pretrained(path)
    assert ours.vocab_size == cfg["vocab_size"] == model.model.embed_tokens.num_embeddings
    ids = torch.tensor([ours.encode("### Instruction:\nWho wrote it?\n\n### Response:\n[Retrieval]<paragraph>")])
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert logits.shape == (1, ids.shape[1], cfg["vocab_size"]) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tokenizer_loads_in_transformers(checkpoints, name):
    path = checkpoints[name]
    cfg = json.loads((path / "config.json").read_text())
    tok, ours = slow_llama_tokenizer().from_pretrained(path), Tokenizer.from_pretrained(path)
    assert len(tok) == ours.vocab_size == cfg["vocab_size"]
    assert cfg["pad_token_id"] == ours.pad_id == tok.pad_token_id
    text = "### Instruction:\nWho wrote it?\n\n### Response:\n[Retrieval]<paragraph>"
    assert tok(text).input_ids == ours.encode(text)


def test_logits_have_a_spread(checkpoints):
    """Neither near-uniform nor one-hot, and attention that is not uniform, with the default init."""
    model, _ = _load_hf(checkpoints["single"])
    tok = Tokenizer.from_pretrained(checkpoints["single"])
    ids = torch.tensor([tok.encode("### Instruction:\nWhere was the paper written?\n\n### Response:\n")])
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    probs = out.logits[0].softmax(-1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    uniform = math.log(probs.shape[-1])
    assert 0.3 * uniform < entropy.mean() < 0.8 * uniform
    assert probs.max(-1).values.max() < 0.95
    attn = out.attentions[0][0, :, -1]  # the last query, every head
    attn_entropy = -(attn * attn.clamp_min(1e-30).log()).sum(-1)
    assert (attn_entropy < 0.97 * math.log(ids.shape[1])).all()


def test_shard_index(checkpoints):
    for name, stem, ext, n in (("sharded", "model", "safetensors", 3), ("bin_sharded", "pytorch_model", "bin", 2)):
        path = checkpoints[name]
        index = json.loads((path / f"{stem}.{ext}.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert files == [f"{stem}-{k:05d}-of-{n:05d}.{ext}" for k in range(1, n + 1)]
        assert not (path / f"{stem}.{ext}").exists()
        tensors = {}
        for f in files:
            part = load_file(path / f) if ext == "safetensors" else torch.load(path / f, weights_only=True)
            assert all(index["weight_map"][k] == f for k in part)
            tensors.update(part)
        assert set(tensors) == set(index["weight_map"])
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_files_and_config(checkpoints):
    path = checkpoints["single"]
    names = {f.name for f in path.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                     "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"}
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_act"], cfg["attention_bias"], cfg["mlp_bias"]) == ("silu", False, False)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["vocab_size"]) == (1, 2, 336)
    assert cfg == tiny_config(vocab_size=336, pad_token_id=335)
    gen = json.loads((path / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 335)
    weights = load_file(path / "model.safetensors")
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (64, 160)
    norm = weights["model.layers.1.post_attention_layernorm.weight"]
    assert norm.std() > 0.05 and abs(norm.mean() - 1) < 0.1
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_cfg["legacy"] is True and tok_cfg["tokenizer_class"] == "LlamaTokenizer"
    assert (tok_cfg["add_bos_token"], tok_cfg["add_eos_token"], tok_cfg["clean_up_tokenization_spaces"]) == (
        True, False, False)
    assert json.loads((path / "added_tokens.json").read_text()) == {
        t: 320 + k for k, t in enumerate(SELFRAG_ADDED_TOKENS)}


def test_reproducible(tmp_path, checkpoints):
    for name in ("single", "bin_sharded"):
        again = write_tiny_checkpoint(tmp_path / name, seed=3, **VARIANTS[name])
        assert _files(again) == _files(checkpoints[name]), name
    other = write_tiny_checkpoint(tmp_path / "other_seed", seed=4)
    a, b = load_file(checkpoints["single"] / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and all(not torch.equal(a[k], b[k]) for k in a)
    # Checkpoints share the tokenizer whatever the weight seed.
    for f in ("tokenizer.model", "added_tokens.json", "tokenizer_config.json"):
        assert (other / f).read_bytes() == (checkpoints["single"] / f).read_bytes()


def test_sentencepiece_training_is_deterministic_and_trained_once(tmp_path, monkeypatch):
    monkeypatch.setattr(testing, "_sp_cache", {})
    trained = []
    train = testing.sentencepiece_model
    monkeypatch.setattr(testing, "sentencepiece_model", lambda *a, **k: trained.append(1) or train(*a, **k))
    first = train_sentencepiece(320, seed=5)
    # The suite's many tiny checkpoints share one training per (size, seed): the second ask is the cache's.
    assert train_sentencepiece(320, seed=5) is first and len(trained) == 1
    testing._sp_cache.clear()
    assert train_sentencepiece(320, seed=5) == first and len(trained) == 2
    assert train_sentencepiece(320, seed=6) != first
    assert write_tokenizer(tmp_path / "t", vocab_pieces=320, seed=5) == 336
    assert (tmp_path / "t" / "tokenizer.model").read_bytes() == first
    assert write_tokenizer(tmp_path / "big", vocab_pieces=800, seed=5) == 816


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="weight_format"):
        write_tiny_checkpoint(tmp_path / "a", weight_format="gguf")
    with pytest.raises(ValueError, match="shards=100"):
        write_tiny_checkpoint(tmp_path / "b", shards=100)
    with pytest.raises(ValueError, match="do not divide evenly"):
        write_tiny_checkpoint(tmp_path / "c", num_key_value_heads=3)
    with pytest.raises(ValueError, match="cannot train a SentencePiece model of 280 pieces"):
        write_tokenizer(tmp_path / "d", vocab_pieces=280)


def test_tokenizer_padded_to_a_full_vocabulary(tmp_path):
    LlamaTokenizer = slow_llama_tokenizer()
    size = write_tokenizer(tmp_path, pad_to=1000)
    assert size == 1016
    ours, hf = Tokenizer.from_pretrained(tmp_path), LlamaTokenizer.from_pretrained(tmp_path)
    assert ours.vocab_size == len(hf) == 1016
    assert ours.reflection_token_ids().groups()["retrieval"][0] == 1001 == hf.convert_tokens_to_ids("[Retrieval]")
    text = "the river was born in 1923, café"
    assert ours.encode(text) == hf.encode(text)
    assert ours.decode(ours.encode(text, add_bos=False)) == text
