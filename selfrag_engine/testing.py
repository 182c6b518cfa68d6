"""Tiny Hugging Face Llama checkpoints with the Self-RAG tokenizer, written from a seed.

    write_tiny_checkpoint("/tmp/tiny", seed=0)   # config.json, weights, tokenizer files

The files follow the layout of the published Self-RAG checkpoint (a Llama-2 SentencePiece model with 16 added
tokens after its pieces, `LlamaForCausalLM` weights under Hugging Face names), so the same loaders, tokenizer
and tests serve both. The weights are random; the text they produce is noise.
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any, Iterable

import sentencepiece as spm
import torch
from safetensors.torch import save_file

from selfrag_engine.vocab import ADDED_TOKENS, ADDITIONAL_SPECIAL_TOKENS, PAD_TOKEN

__all__ = ["WORDS", "random_state_dict", "sentencepiece_model", "tiny_config", "train_sentencepiece",
           "write_tiny_checkpoint", "write_tokenizer", "write_tokenizer_files", "write_weights"]

# <unk>, <s>, </s> and the 256 byte-fallback pieces.
_RESERVED_PIECES = 3 + 256

# The common words of the generated corpus (the benchmarks build their filler text from them too).
WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had "
    "first new one their after who also two its but been they not more time city year world state music film "
    "team school history river house water people language family paper model answer question evidence "
    "passage title born capital instruction response input retrieval true false yes no"
).split()
_RARE = ("café", "naïve", "日本", "東京", "über", "Zürich", "façade", "😀", "🚀", "—", "…", "“quoted”", "½", "ß")
_PUNCT = ".,.,.,;:!?()'\"-/%&#"  # '.' and ',' weighted up

# The trainer options every SentencePiece model of the project shares: Llama-2's (see `sentencepiece_model`).
_LLAMA_SP_OPTIONS: dict[str, Any] = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", normalization_rule_name="identity",
    remove_extra_whitespaces=False, add_dummy_prefix=True, num_threads=1, shuffle_input_sentence=False,
    input_sentence_size=0, minloglevel=2)

_sp_cache: dict[tuple[int, int | None], bytes] = {}


def _corpus(seed: int, num_lines: int = 1500) -> list[str]:
    """English-like lines with digits, punctuation and rare unicode. Newlines separate the lines and never
    occur inside one, so '\\n' stays out of the learned pieces and falls back to its byte, as in Llama-2."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words: list[str] = []
        for _ in range(rng.randint(3, 14)):
            r = rng.random()
            if r < 0.76:
                w = rng.choice(WORDS)
                words.append(w.capitalize() if rng.random() < 0.04 else w)
            elif r < 0.88:
                words.append(str(rng.randint(0, 10 ** rng.randint(1, 5))))
            elif r < 0.98 and words:
                words[-1] += rng.choice(_PUNCT)
            else:
                words.append(rng.choice(_RARE))
        lines.append(" ".join(words))
    return lines


def _character_coverage(lines: list[str], max_chars: int) -> float:
    """The SentencePiece character_coverage that keeps the `max_chars` most frequent characters as pieces, or
    as close as the trainer's lower bound of 0.98 allows.

    A tiny vocabulary cannot hold every character of the corpus next to the 259 reserved pieces; the rest fall
    back to bytes. The trainer adds characters by decreasing count while the covered fraction is below the
    coverage, counting the '▁' of every space and of the dummy prefix; a value between the fractions covered by
    max_chars - 1 and max_chars characters stops it after exactly max_chars."""
    counts: dict[str, int] = {}
    for line in lines:
        for ch in "▁" + line.replace(" ", "▁"):
            counts[ch] = counts.get(ch, 0) + 1
    ordered = sorted(counts.values(), reverse=True)
    if max_chars >= len(ordered):
        return 1.0
    total = sum(ordered)
    below = sum(ordered[:max_chars - 1]) / total
    at = sum(ordered[:max_chars]) / total
    return max(0.98, (below + at) / 2)


def sentencepiece_model(sentences: Iterable[str], vocab_size: int, *, seed: int = 0, **options: Any) -> bytes:
    """A serialized SentencePiece BPE model trained on `sentences` with Llama-2's options (byte fallback,
    <unk>/<s>/</s> = 0/1/2, no pad, digits split, identity normalization, dummy prefix, spaces kept);
    `options` adds or overrides trainer options. Deterministic: one thread, no sampling or shuffling of the
    input, the trainer's generator seeded with `seed`."""
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(**{**_LLAMA_SP_OPTIONS, "sentence_iterator": iter(sentences),
                                      "model_writer": model, "vocab_size": vocab_size, **options})
    return model.getvalue()


def train_sentencepiece(vocab_pieces: int = 320, seed: int = 0, pad_to: int | None = None) -> bytes:
    """A serialized Llama-2-style SentencePiece BPE model (see `sentencepiece_model`) trained on a corpus
    generated from `seed`. Cached per (vocab_pieces, seed, pad_to).

    pad_to: grow the model to exactly this many pieces with unused symbols `<extra_i>` (ids 3..), so that a
    model with Llama-2's full vocabulary of 32000 pieces gets a tokenizer of the same size in a second."""
    key = (vocab_pieces, seed, pad_to)
    if key in _sp_cache:
        return _sp_cache[key]
    lines = _corpus(seed)
    # Two thirds of the free slots for single characters leaves the rest for merges at the default size.
    free = vocab_pieces - _RESERVED_PIECES
    extra: list[str] = []
    if pad_to is not None:
        base = spm.SentencePieceProcessor(model_proto=train_sentencepiece(vocab_pieces, seed)).get_piece_size()
        if pad_to < base:
            raise ValueError(f"pad_to={pad_to} is below the {base} pieces the model has without padding")
        extra = [f"<extra_{i}>" for i in range(pad_to - base)]
    try:
        proto = sentencepiece_model(
            lines, vocab_pieces + len(extra), seed=seed, user_defined_symbols=extra,
            character_coverage=_character_coverage(lines, max(1, free * 2 // 3)), hard_vocab_limit=False)
    except RuntimeError as e:
        raise ValueError(f"cannot train a SentencePiece model of {vocab_pieces} pieces ({_RESERVED_PIECES} are "
                         f"reserved for <unk>, <s>, </s> and the byte fallback; about 310 is the least): {e}") from e
    _sp_cache[key] = proto
    return proto


def _added_token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def write_tokenizer_files(path: str | Path, proto: bytes, *, legacy: bool = True,
                          model_max_length: int = 2048) -> int:
    """Writes `tokenizer.model` (the serialized SentencePiece model `proto`), `tokenizer_config.json`,
    `special_tokens_map.json` and `added_tokens.json` as the published Self-RAG checkpoint has them: the 16
    Self-RAG tokens get the ids right after the SentencePiece pieces. Returns the full vocabulary size
    (pieces + 16)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(proto)
    num_pieces = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    added = {tok: num_pieces + i for i, tok in enumerate(ADDED_TOKENS)}

    decoder = {"0": _added_token_entry("<unk>"), "1": _added_token_entry("<s>"), "2": _added_token_entry("</s>")}
    decoder.update({str(i): _added_token_entry(tok) for tok, i in added.items()})
    special_map = {"additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS), "bos_token": "<s>",
                   "eos_token": "</s>", "pad_token": PAD_TOKEN, "unk_token": "<unk>"}
    config = {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
        **special_map,
        "clean_up_tokenization_spaces": False, "legacy": legacy, "model_max_length": model_max_length,
        "padding_side": "right", "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer", "use_default_system_prompt": False,
    }
    _write_json(path / "tokenizer_config.json", config)
    _write_json(path / "special_tokens_map.json", special_map)
    _write_json(path / "added_tokens.json", added)
    return num_pieces + len(ADDED_TOKENS)


def write_tokenizer(path: str | Path, *, vocab_pieces: int = 320, seed: int = 0, legacy: bool = True,
                    model_max_length: int = 2048, pad_to: int | None = None) -> int:
    """The tokenizer files (`write_tokenizer_files`) of a SentencePiece model trained on the corpus generated
    from `seed` (`train_sentencepiece`). Returns the full vocabulary size (pieces + 16)."""
    return write_tokenizer_files(path, train_sentencepiece(vocab_pieces, seed, pad_to), legacy=legacy,
                                 model_max_length=model_max_length)


def _write_json(file: Path, obj: dict) -> None:
    file.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def tiny_config(**overrides) -> dict:
    """A `config.json` dict as transformers writes it for `LlamaForCausalLM`, with tiny default sizes."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": None, "tie_word_embeddings": False, "vocab_size": 336, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1, "initializer_range": 0.02,
        "use_cache": True,
    }
    cfg.update(overrides)
    if cfg["num_key_value_heads"] is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    return dict(sorted(cfg.items()))


def random_state_dict(cfg: dict, seed: int, init_std: float | None = None) -> dict[str, torch.Tensor]:
    """Random float32 weights under Hugging Face Llama names, drawn in a fixed order from one seeded generator.

    With `init_std=None` every matrix is N(0, 1/fan_in), which keeps activations of order one at any width:
    attention scores vary enough that position and masking bugs show, every layer moves the residual stream,
    and the logits have a spread (softmax neither near-uniform nor one-hot). A float gives every matrix that
    standard deviation, as transformers initialises (`initializer_range`). Norm weights are 1 + 0.1 N(0, 1) so
    that a norm whose weight is dropped or misapplied shows."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = hidden // heads

    def matrix(rows: int, cols: int, std: float | None = None) -> torch.Tensor:
        if std is None:
            std = init_std if init_std is not None else cols ** -0.5
        return torch.randn(rows, cols, generator=gen) * std

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(hidden, generator=gen)

    # The logits are the final norm's output (rms one) times lm_head: a std of 2.5 / sqrt(hidden) gives logits
    # of std about 2.5. When tied, the embedding is that same matrix.
    head_std = init_std if init_std is not None else 2.5 * hidden ** -0.5
    embed_std = head_std if cfg["tie_word_embeddings"] else (init_std if init_std is not None else 1.0)
    state = {"model.embed_tokens.weight": matrix(vocab, hidden, embed_std)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = matrix(heads * head_dim, hidden)
        state[p + "self_attn.k_proj.weight"] = matrix(kv_heads * head_dim, hidden)
        state[p + "self_attn.v_proj.weight"] = matrix(kv_heads * head_dim, hidden)
        state[p + "self_attn.o_proj.weight"] = matrix(hidden, heads * head_dim)
        state[p + "mlp.gate_proj.weight"] = matrix(inter, hidden)
        state[p + "mlp.up_proj.weight"] = matrix(inter, hidden)
        state[p + "mlp.down_proj.weight"] = matrix(hidden, inter)
        state[p + "input_layernorm.weight"] = norm()
        state[p + "post_attention_layernorm.weight"] = norm()
    state["model.norm.weight"] = norm()
    if not cfg["tie_word_embeddings"]:
        state["lm_head.weight"] = matrix(vocab, hidden, head_std)
    return state


def _split(names: list[str], shards: int) -> list[list[str]]:
    """Contiguous groups of tensor names, as even in count as possible."""
    if not 1 <= shards <= len(names):
        raise ValueError(f"shards={shards} must be between 1 and the number of tensors ({len(names)})")
    size, extra = divmod(len(names), shards)
    out, start = [], 0
    for k in range(shards):
        end = start + size + (1 if k < extra else 0)
        out.append(names[start:end])
        start = end
    return out


def write_weights(path: Path, state: dict[str, torch.Tensor], *, shards: int = 1,
                  weight_format: str = "safetensors") -> None:
    """Writes the state dict in one of the layouts transformers saves: `model.safetensors`, `pytorch_model.bin`,
    or numbered shards with an index mapping each tensor to its file."""
    if weight_format == "safetensors":
        stem, ext, index_name = "model", "safetensors", "model.safetensors.index.json"
    elif weight_format == "bin":
        stem, ext, index_name = "pytorch_model", "bin", "pytorch_model.bin.index.json"
    else:
        raise ValueError(f"weight_format must be 'safetensors' or 'bin', not {weight_format!r}")
    groups = _split(list(state), shards)
    weight_map: dict[str, str] = {}
    for k, names in enumerate(groups, start=1):
        file = f"{stem}.{ext}" if shards == 1 else f"{stem}-{k:05d}-of-{shards:05d}.{ext}"
        part = {n: state[n].contiguous() for n in names}
        if weight_format == "safetensors":
            save_file(part, str(path / file), metadata={"format": "pt"})
        else:
            torch.save(part, path / file)
        weight_map.update({n: file for n in names})
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        _write_json(path / index_name, {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_tiny_checkpoint(
    path: str | Path, *, seed: int = 0, hidden_size: int = 64, intermediate_size: int = 160,
    num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int | None = None,
    max_position_embeddings: int = 512, rms_norm_eps: float = 1e-5, rope_theta: float = 10000.0,
    rope_scaling: dict | None = None, tie_word_embeddings: bool = False, vocab_pieces: int = 320,
    torch_dtype: torch.dtype = torch.float32, shards: int = 1, weight_format: str = "safetensors",
    init_std: float | None = None, legacy: bool = True,
) -> Path:
    """Writes a complete Hugging Face Llama checkpoint directory: tokenizer files (`write_tokenizer`, always
    trained with seed 0 so that checkpoints of one vocabulary size share a tokenizer), `config.json`,
    `generation_config.json` and weights from `seed` (see `random_state_dict`), stored in `torch_dtype`.
    Returns the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(path, vocab_pieces=vocab_pieces, seed=0, legacy=legacy,
                                 model_max_length=max_position_embeddings)
    pad_id = vocab_size - 1  # <pad> is the last added token
    dtype_name = str(torch_dtype).removeprefix("torch.")
    cfg = tiny_config(
        hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=rms_norm_eps, rope_theta=rope_theta,
        rope_scaling=rope_scaling, tie_word_embeddings=tie_word_embeddings, vocab_size=vocab_size,
        torch_dtype=dtype_name, pad_token_id=pad_id,
        initializer_range=init_std if init_std is not None else 0.02,
    )
    if hidden_size % num_attention_heads or num_attention_heads % cfg["num_key_value_heads"]:
        raise ValueError(f"hidden_size {hidden_size}, num_attention_heads {num_attention_heads} and "
                         f"num_key_value_heads {cfg['num_key_value_heads']} do not divide evenly")
    _write_json(path / "config.json", cfg)
    _write_json(path / "generation_config.json",
                {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": pad_id})
    state = {name: t.to(torch_dtype) for name, t in random_state_dict(cfg, seed, init_std).items()}
    write_weights(path, state, shards=shards, weight_format=weight_format)
    return path
