"""Trains the tiny Self-RAG model on the synthetic world, on the CPU, and measures it on held-out data.

    python -m selfrag_engine.tiny.train --out DIR [--steps N] [--seed 0] [--snapshot-every N]
    python -m selfrag_engine.tiny.train --out DIR2 --init-from DIR [--steps N] [--skill-fraction F] ...

Writes a Hugging Face checkpoint directory (config.json, model.safetensors, generation_config.json, the
SentencePiece tokenizer with the 16 Self-RAG tokens), corpus.jsonl (the world's passages), examples.json
(held-out questions, instructions and long-form requests for demos) and training.json (the run's settings,
its statistics and the held-out evaluation of `selfrag_engine.tiny.evaluate`, short form and long form, which
reads the written checkpoint through the engine). A run is fixed by its seed and step count (which also sets
the learning-rate schedule): the same command gives the same weights with the same thread count (2) on the
same kind of CPU. `--init-from DIR` starts from DIR's weights and tokenizer instead (a further stage, with
its own schedule and mix), and its training.json keeps the earlier stages' commands and statistics.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from selfrag_engine.config import LlamaConfig
from selfrag_engine.models.llama import Llama
from selfrag_engine.testing import sentencepiece_model, write_tokenizer_files
from selfrag_engine.tiny.assets import EXAMPLES_FILE, TRAINING_FILE, write_corpus
from selfrag_engine.tiny.evaluate import (
    evaluate,
    expected_answer,
    load_selfrag,
    world_and_split,
)
from selfrag_engine.tiny import long_form_data
from selfrag_engine.tiny.training_data import (
    Encoded,
    Split,
    TrainingStream,
    branch_cases,
    encode_example,
    heldout_instructions,
    irrelevant_example,
    relevant_example,
)
from selfrag_engine.tiny.world import World
from selfrag_engine.tokenizer import Tokenizer
from selfrag_engine.vocab import ADDED_TOKENS


def log(message: str) -> None:
    print(message, flush=True)


@dataclass
class ModelShape:
    # Heads of 64, as in Llama-2 (128 in the 7B), so the kernels run at a head size real checkpoints have. A run
    # 256 wide with 8 heads of 32 stalled: the held-out relevance stayed near chance and no answer was copied
    # exactly after 2000 steps, where 192 wide with 4 heads of 48 had learned both. On 2 AVX2 cores in float32 a
    # step of this shape took 1.4 s (batches aside), of 192 wide with 3 heads of 64 1.15 s.
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 512
    # Tied input and output embeddings: copying a token the model has rarely seen (the pieces of an unseen
    # name) then needs no trained output row of its own. Untied, the same recipe picked the right passage
    # but garbled most names and values it copied out of it.
    tie_word_embeddings: bool = True


@dataclass
class TrainConfig:
    seed: int = 0
    # About two hours on 2 AVX2 cores in float32: the default shape with long-form answers in the mix ran 1.8 s a
    # step there (batches included), with about a minute for the tokenizer and a few for the evaluation.
    steps: int = 3500
    # Stop after this many steps of the `steps`-step schedule (None: run it all): the weights a longer schedule
    # has at that step, for runs that must fit in less time than the schedule they are compared with.
    stop_after: int | None = None
    batch_size: int = 32
    # At 3e-3 the model learned the decisions but never learned to copy: trained on nothing but copy tasks
    # its loss stayed flat for 1500 steps, where at 1e-3 it fell within 600.
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    # Large enough that most first and last names of the world are one or two pieces: comparing the names of
    # question and passage, and copying them, is then a comparison of a few tokens instead of eight.
    sp_vocab_size: int = 2400
    # Shares of world questions asked about remixed and fresh worlds' people (see TrainingStream).
    remix_fraction: float = 0.0
    fresh_fraction: float = 0.7
    world_fraction: float = 0.7
    # Share of the no-fact examples that only ask to repeat made-up names and years. Without them the model
    # learned when to retrieve and which passage is relevant, but after 6000 steps still could not repeat an
    # unseen name: copying arrived too slowly from the few copied tokens of each world answer.
    copy_fraction: float = 0.5
    # Share of the other no-fact examples drawn from `SKILL_TASKS` (wider phrases, sums, counts). 0 in the
    # first stage, whose stream is the one the committed model's first stage was trained on.
    skill_fraction: float = 0.0
    # Share of the no-fact examples other than copy tasks drawn from `SHAPE_TASKS` (phrases of new shapes,
    # counts across decades, made-up names). 0 in the first two stages.
    shape_fraction: float = 0.0
    # Share of the world draws that are long-form requests ("Tell me about X", long_form_data) instead of a
    # question pair. At 0.4 they are 16% of the examples and 31% of the target tokens (an answer has 4 to 5
    # times the target tokens of a short one); the question pairs keep 47% of the examples (53% without).
    long_form_fraction: float = 0.4
    # Decision tokens (the retrieval tokens, at the first response position and between long-form sentences, and
    # the relevance token) carry the behaviour the scores read; weighting them keeps them from being drowned by
    # the many copy tokens of each answer.
    decision_weight: float = 3.0
    # Examples are drawn this many batches at a time and batched by length, which cuts the padding by half.
    bucket_batches: int = 8
    # bf16 autocast (None: where the CPU has bf16 matrix instructions, `bf16_is_native`): with AMX or AVX512-BF16
    # the matrix products run about 4x faster; on an AVX2-only CPU they are emulated, and 7 steps of the
    # 256-wide shape took over a minute where float32 takes 1.4 s a step. Master weights, optimizer state and the
    # loss stay float32.
    bf16: bool | None = None
    # Write the weights so far to DIR/step-N every this many steps (0: never), to inspect a run under way.
    snapshot_every: int = 0


def bf16_is_native(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU multiplies bf16 matrices natively (AMX or AVX512-BF16), read from the kernel's flags."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", flags) is not None


def new_stream(world: World, split: Split, cfg: TrainConfig, seed: int) -> TrainingStream:
    return TrainingStream(world, split, seed=seed, world_fraction=cfg.world_fraction,
                          remix_fraction=cfg.remix_fraction, fresh_fraction=cfg.fresh_fraction,
                          copy_fraction=cfg.copy_fraction, skill_fraction=cfg.skill_fraction,
                          shape_fraction=cfg.shape_fraction,
                          long_form_fraction=cfg.long_form_fraction, long_form=long_form_data.training_examples)


# ---- tokenizer -----------------------------------------------------------------------------------


def tokenizer_sentences(stream: TrainingStream, num_examples: int) -> list[str]:
    """Plain-text lines for SentencePiece: the training passages and sampled training examples, cut at the
    Self-RAG tokens and at newlines. Cutting at the added tokens mirrors how the HF legacy tokenizer encodes
    each span on its own; cutting at newlines keeps '\\n' out of the learned pieces, so it falls back to its
    byte as in Llama. Held-out text stays out, so that no piece exists whose embedding training never saw."""
    texts = [p.title + "\n" + p.text for p in stream.main.index.passages]
    for _ in range(num_examples):
        ex = stream.next()
        texts.append(ex.prompt + ex.response)
    out = []
    for text in texts:
        for tok in ADDED_TOKENS:
            text = text.replace(tok, "\n")
        out += [line for line in text.split("\n") if line]
    return out


def write_world_tokenizer(path: Path, sentences: list[str], vocab_pieces: int, model_max_length: int = 512) -> int:
    """Trains a SentencePiece BPE model with Llama-2's options (`testing.sentencepiece_model`) on the
    sentences, every character kept as a piece, and writes the HF tokenizer files
    (`testing.write_tokenizer_files`), the 16 Self-RAG tokens right after the pieces. Deterministic for given
    sentences. Returns the full vocabulary size (pieces + 16)."""
    proto = sentencepiece_model(sentences, vocab_pieces, seed=0, character_coverage=1.0)
    return write_tokenizer_files(path, proto, model_max_length=model_max_length)


def load_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(path)


# ---- model ---------------------------------------------------------------------------------------


def hf_config(shape: ModelShape, vocab_size: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers, "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_attention_heads,
        "head_dim": shape.hidden_size // shape.num_attention_heads,
        "max_position_embeddings": shape.max_position_embeddings, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "pretraining_tp": 1, "tie_word_embeddings": shape.tie_word_embeddings, "use_cache": True,
        "vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": vocab_size - 1,
        "torch_dtype": "float32", "transformers_version": "4.57.6",
    }


def new_model(config: LlamaConfig, seed: int) -> Llama:
    torch.manual_seed(seed)
    model = Llama(config)
    model.tie_weights()
    model.init_rope()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            torch.nn.init.ones_(p)
        else:
            # GPT-2's scaled init of the residual-branch outputs keeps early training stable without warm-up tricks.
            std = 0.02 / math.sqrt(2 * config.num_hidden_layers) if name.endswith(("o_proj.weight",
                                                                                   "down_proj.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)
    return model


# ---- training --------------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    targets: torch.Tensor    # [B, L - 1]
    weights: torch.Tensor    # [B, L - 1], 0 where not a target


def make_batch(encoded: list[Encoded], pad_id: int, decision_ids: set[int], decision_weight: float) -> Batch:
    length = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    weights = torch.zeros(len(encoded), length)
    for i, e in enumerate(encoded):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        for j, (t, m) in enumerate(zip(e.input_ids, e.loss_mask)):
            if m:
                weights[i, j] = decision_weight if t in decision_ids else 1.0
    return Batch(ids, ids[:, 1:], weights[:, 1:])


def length_bucketed(stream: TrainingStream, tokenizer, cfg: TrainConfig, rng: random.Random):
    """Endless batches of encoded examples: each draw of bucket_batches batches is sorted by length, cut into
    batches and shuffled."""
    while True:
        pool = [encode_example(stream.next(), tokenizer) for _ in range(cfg.batch_size * cfg.bucket_batches)]
        pool.sort(key=lambda e: len(e.input_ids))
        groups = [pool[i:i + cfg.batch_size] for i in range(0, len(pool), cfg.batch_size)]
        rng.shuffle(groups)
        yield from groups


def batch_loss(model: Llama, batch: Batch, bf16: bool = False) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model.forward_dense(batch.input_ids[:, :-1])
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch.targets.reshape(-1),
                          reduction="none")
    w = batch.weights.reshape(-1)
    return (nll * w).sum() / w.sum()


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class Probe:
    """A cheap held-out check run during training: relevance-token accuracy on (question, gold passage) and
    (question, top lexical distractor) pairs, and teacher-forced exactness of the gold answers."""
    batch: Batch
    rel_rows: list[tuple[int, int]]  # (row, position predicting the relevance token)
    want_rel: list[bool]
    answer_spans: list[tuple[int, int, int]]  # (row, first answer position, end)


def make_probe(world: World, split: Split, tokenizer, n: int = 48) -> Probe:
    close_id = tokenizer.token_to_id("</paragraph>")
    encoded, rel_rows, want, spans = [], [], [], []
    for case in branch_cases(world, split, n, k=2, seed=123):
        gold = case.passages[case.gold_index]
        other = case.passages[1 - case.gold_index]
        for ex, is_rel in ((relevant_example(case.question, gold), True),
                           (irrelevant_example(case.question, other), False)):
            e = encode_example(ex, tokenizer)
            row, c = len(encoded), e.input_ids.index(close_id)
            encoded.append(e)
            rel_rows.append((row, c))
            want.append(is_rel)
            if is_rel:
                spans.append((row, c + 1, len(e.input_ids) - 1))
    batch = make_batch(encoded, tokenizer.token_to_id("<pad>"), set(), 1.0)
    return Probe(batch, rel_rows, want, spans)


@dataclass
class LongFormProbe:
    """Held-out long-form targets, teacher-forced: how many of their sentences the model writes exactly (the
    decision tokens between them are drawn at random in the data, so only the sentences are read)."""
    batch: Batch
    sentences: list[tuple[int, int, int]]  # (row, first position predicting the sentence, end)


def make_long_form_probe(world: World, split: Split, tokenizer, n: int = 24) -> LongFormProbe:
    control = {tokenizer.token_to_id(t) for t in ADDED_TOKENS} | {tokenizer.eos_id}
    rng = random.Random(321)
    encoded, spans = [], []
    for case in long_form_data.long_form_cases(world, split, n, seed=321):
        e = encode_example(long_form_data.long_form_example(case, rng), tokenizer)
        row = len(encoded)
        encoded.append(e)
        run = None
        for i, (t, m) in enumerate(zip(e.input_ids, e.loss_mask)):
            if m and t not in control and run is None:
                run = i
            elif (not m or t in control) and run is not None:
                spans.append((row, run - 1, i - 1))
                run = None
    batch = make_batch(encoded, tokenizer.token_to_id("<pad>"), set(), 1.0)
    return LongFormProbe(batch, spans)


@torch.inference_mode()
def run_long_form_probe(model: Llama, probe: LongFormProbe) -> float:
    pred = model.forward_dense(probe.batch.input_ids).argmax(-1)
    ids = probe.batch.input_ids
    return sum(bool((pred[r, a:b] == ids[r, a + 1:b + 1]).all()) for r, a, b in probe.sentences) / len(probe.sentences)


@torch.inference_mode()
def run_probe(model: Llama, probe: Probe, tokenizer) -> tuple[float, float]:
    rel_id, irrel_id = tokenizer.token_to_id("[Relevant]"), tokenizer.token_to_id("[Irrelevant]")
    logits = model.forward_dense(probe.batch.input_ids)
    rel_ok = sum((logits[r, p, rel_id] > logits[r, p, irrel_id]).item() == w
                 for (r, p), w in zip(probe.rel_rows, probe.want_rel))
    pred = logits.argmax(-1)
    exact = sum(bool((pred[r, a:b] == probe.batch.input_ids[r, a + 1:b + 1]).all()) for r, a, b in probe.answer_spans)
    return rel_ok / len(probe.rel_rows), exact / len(probe.answer_spans)


def train(model: Llama, tokenizer, stream: TrainingStream, cfg: TrainConfig, probe: Probe | None = None,
          snapshot: "Callable[[dict], None] | None" = None, long_form_probe: LongFormProbe | None = None,
          resume: dict | None = None) -> dict:
    """AdamW over the example stream; returns what the model card records (steps, time, last losses).

    snapshot(state) is called every cfg.snapshot_every steps with the training state (`training_state`);
    `resume`, such a state, continues the run from its step: the weights are the caller's to load, the
    optimizer, the losses and the position in the example stream come from the state (the stream is replayed
    from its seed up to that step), so a resumed run ends with the weights of one that never stopped."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    decision_ids = {tokenizer.token_to_id(t) for t in ("[Retrieval]", "[No Retrieval]", "[Continue to Use Evidence]",
                                                       "[Relevant]", "[Irrelevant]")}
    pad_id = tokenizer.token_to_id("<pad>")
    bf16 = bf16_is_native() if cfg.bf16 is None else cfg.bf16
    total = cfg.steps
    start = time.perf_counter()
    losses: list[float] = []
    step = 0
    batches = length_bucketed(stream, tokenizer, cfg, random.Random(cfg.seed + 1))
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        step, losses = resume["step"], list(resume["losses"])
        for _ in range(step):
            next(batches)
        log(f"resumed at step {step} (example stream replayed in {time.perf_counter() - start:.0f}s)")
    model.train()
    while True:
        if step >= total or (cfg.stop_after is not None and step >= cfg.stop_after):
            break
        batch = make_batch(next(batches), pad_id, decision_ids, cfg.decision_weight)
        lr = lr_at(step, total, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = batch_loss(model, batch, bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            extra = ""
            if probe is not None and step % 200 == 0:
                model.eval()
                rel_acc, answer_exact = run_probe(model, probe, tokenizer)
                model.train()
                extra = f"  held-out relevance {rel_acc:.3f} answers {answer_exact:.3f}"
                if long_form_probe is not None:
                    model.eval()
                    extra += f"  long-form sentences {run_long_form_probe(model, long_form_probe):.3f}"
                    model.train()
            log(f"step {step}/{total}  loss {sum(losses[-50:]) / 50:.4f}  lr {lr:.2e}  "
                f"{time.perf_counter() - start:.0f}s{extra}")
        if snapshot is not None and cfg.snapshot_every and step % cfg.snapshot_every == 0:
            snapshot(training_state(step, opt, losses))
    model.eval()
    return {"steps": step, "planned_steps": total, "seconds": round(time.perf_counter() - start, 1),
            "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4)}



TRAINING_STATE_FILE = "training_state.pt"


def write_snapshot(model: Llama, out: Path, config: dict, state: dict) -> Path:
    """OUT/step-N: the weights so far (as `save_checkpoint` writes them) and the training state."""
    snap = out / f"step-{state['step']}"
    save_checkpoint(model, out, config, snap)
    torch.save(state, snap / TRAINING_STATE_FILE)
    return snap


def load_weights(model: Llama, path: Path) -> None:
    """Loads weights `save_checkpoint` wrote into `model` (a tied output head shares the embedding it was
    written as)."""
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing}, unexpected {unexpected}")


def read_snapshot(model: Llama, snap: Path) -> dict:
    """Loads a snapshot's weights into `model` and returns its training state, for `train(resume=...)`."""
    load_weights(model, snap / "model.safetensors")
    return torch.load(snap / TRAINING_STATE_FILE, weights_only=True)


TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def earlier_stages(init: Path) -> list[dict]:
    """The stages that made the checkpoint in `init` (its training.json's, oldest first), for the record."""
    record = json.loads((init / TRAINING_FILE).read_text())
    stage = {k: record[k] for k in ("command", "train_config", "training")}
    return record.get("earlier_stages", []) + [stage]


def shape_of(config: dict) -> ModelShape:
    return ModelShape(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                      config["num_attention_heads"], config["max_position_embeddings"],
                      config["tie_word_embeddings"])


def training_state(step: int, opt: torch.optim.Optimizer, losses: list[float]) -> dict:
    """What `train(resume=...)` needs besides the weights to continue a run exactly; of the losses, only the
    last 50 (what the log averages)."""
    return {"step": step, "optimizer": opt.state_dict(), "losses": losses[-50:]}


# ---- output ----------------------------------------------------------------------------------------


def save_checkpoint(model: Llama, out: Path, config: dict, weights_dir: Path | None = None) -> None:
    """Writes the weights (fp32) and config into `out`, or only the weights into `weights_dir` (a snapshot).
    Tied embeddings are written once, as `model.embed_tokens.weight`, as transformers writes them."""
    tied = config.get("tie_word_embeddings", False)
    state = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()
             if not k.startswith("rope_") and not (tied and k == "lm_head.weight")}
    if weights_dir is not None:
        weights_dir.mkdir(parents=True, exist_ok=True)
        save_file(state, str(weights_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                  "pad_token_id": config["pad_token_id"], "transformers_version": config["transformers_version"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def write_examples(world: World, split: Split, out: Path, n: int = 8) -> None:
    """A few held-out questions (one per attribute kind first), instructions and long-form requests, for demos."""
    questions, seen = [], set()
    for case in branch_cases(world, split, 200, k=2, seed=7):
        q = case.question
        key = (world.entity(q.entity_id).kind, q.attribute)
        if key not in seen and not q.heldout_phrasing:
            seen.add(key)
            questions.append({"question": q.text, "gold": q.gold})
    instructions = [{"instruction": ex.instruction, "answer": expected_answer(ex)}
                    for ex in heldout_instructions(world, split, n, seed=7)]
    record = {"questions": questions[:n], "instructions": instructions,
              "long_form": long_form_data.demo_requests(world, split)}
    (out / EXAMPLES_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=ModelShape.hidden_size)
    parser.add_argument("--intermediate", type=int, default=ModelShape.intermediate_size)
    parser.add_argument("--layers", type=int, default=ModelShape.num_hidden_layers)
    parser.add_argument("--heads", type=int, default=ModelShape.num_attention_heads)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--fresh-fraction", type=float, default=TrainConfig.fresh_fraction)
    parser.add_argument("--remix-fraction", type=float, default=TrainConfig.remix_fraction)
    parser.add_argument("--world-fraction", type=float, default=TrainConfig.world_fraction)
    parser.add_argument("--copy-fraction", type=float, default=TrainConfig.copy_fraction)
    parser.add_argument("--skill-fraction", type=float, default=TrainConfig.skill_fraction)
    parser.add_argument("--shape-fraction", type=float, default=TrainConfig.shape_fraction)
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from this checkpoint's weights and tokenizer (a directory this command "
                             "wrote); its shape and vocabulary are kept, so --hidden/--intermediate/--layers/"
                             "--heads/--vocab may not be given with it")
    parser.add_argument("--long-form-fraction", type=float, default=TrainConfig.long_form_fraction)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=TrainConfig.bf16,
                        help="bf16 autocast of the matrix products (default: where the CPU has bf16 "
                             "matrix instructions)")
    parser.add_argument("--snapshot-every", type=int, default=0,
                        help="write the weights and the training state to OUT/step-N every N steps")
    parser.add_argument("--resume", type=Path, default=None,
                        help="continue the run from a snapshot OUT/step-N written with the same arguments")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after N steps of the --steps schedule")
    parser.add_argument("--vocab", type=int, default=TrainConfig.sp_vocab_size, help="SentencePiece pieces")
    parser.add_argument("--eval-questions", type=int, default=None, help="default: every held-out question")
    parser.add_argument("--eval-instructions", type=int, default=300)
    parser.add_argument("--eval-long-form", type=int, default=None,
                        help="long-form cases to evaluate (default: every one; 0: none)")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    # Adam's second moments of embedding rows that get no gradient decay geometrically (beta2 = 0.95) into
    # subnormal floats after ~1500 steps, and subnormal arithmetic made steps ten times slower from then on.
    torch.set_flush_denormal(True)
    cfg = TrainConfig(seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, fresh_fraction=args.fresh_fraction, remix_fraction=args.remix_fraction,
                      world_fraction=args.world_fraction, copy_fraction=args.copy_fraction,
                      skill_fraction=args.skill_fraction, shape_fraction=args.shape_fraction,
                      long_form_fraction=args.long_form_fraction, sp_vocab_size=args.vocab,
                      snapshot_every=args.snapshot_every, stop_after=args.stop_after,
                      bf16=bf16_is_native() if args.bf16 is None else args.bf16)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()

    world, split = world_and_split()
    init: Path | None = args.init_from
    if init is not None:
        shaping = [f"--{dest}" for dest in ("hidden", "intermediate", "layers", "heads", "vocab")
                   if getattr(args, dest) != parser.get_default(dest)]
        if shaping:
            raise SystemExit(f"--init-from keeps the checkpoint's shape and vocabulary: {', '.join(shaping)} "
                             "cannot change them")
        if init.resolve() == out.resolve():
            raise SystemExit("--init-from: give another --out; the new stage writes a new checkpoint")
        for name in TOKENIZER_FILES:
            shutil.copyfile(init / name, out / name)
        config = json.loads((init / "config.json").read_text())
        shape, vocab_size = shape_of(config), config["vocab_size"]
    else:
        shape = ModelShape(args.hidden, args.intermediate, args.layers, args.heads)
        sentences = tokenizer_sentences(new_stream(world, split, cfg, 10_000 + args.seed), 20_000)
        tokenizer_file = out / "tokenizer.model"
        previous = tokenizer_file.read_bytes() if args.resume is not None and tokenizer_file.is_file() else None
        vocab_size = write_world_tokenizer(out, sentences, cfg.sp_vocab_size, shape.max_position_embeddings)
        if previous is not None and tokenizer_file.read_bytes() != previous:
            raise SystemExit(f"--resume: the tokenizer these arguments make differs from the one in {out}")
        config = hf_config(shape, vocab_size)
    tokenizer = load_tokenizer(out)
    model = new_model(LlamaConfig.from_dict(config), args.seed)
    if init is not None and args.resume is None:
        load_weights(model, init / "model.safetensors")
    num_params = sum(p.numel() for p in model.parameters())
    log(f"model: {num_params / 1e6:.2f}M parameters, vocab {vocab_size}")

    stream = new_stream(world, split, cfg, args.seed)
    resume = read_snapshot(model, args.resume) if args.resume is not None else None
    stats = train(model, tokenizer, stream, cfg, make_probe(world, split, tokenizer),
                  lambda state: write_snapshot(model, out, config, state),
                  make_long_form_probe(world, split, tokenizer) if cfg.long_form_fraction > 0 else None,
                  resume=resume)
    if resume is not None:
        stats["resumed_from_step"] = resume["step"]
    save_checkpoint(model, out, config)
    write_corpus(out, world.passages)
    write_examples(world, split, out)
    stats["wall_seconds_with_tokenizer_and_saving"] = round(time.perf_counter() - wall, 1)
    log(f"trained in {stats['seconds']} s; evaluating the written checkpoint through the engine")

    result = evaluate(load_selfrag(out), world, split, args.eval_questions, args.eval_instructions,
                      num_long_form=args.eval_long_form)
    log(json.dumps(result.summary(), indent=2))
    record = {"command": "python -m selfrag_engine.tiny.train " + " ".join(sys.argv[1:] if argv is None else argv),
              "threads": torch.get_num_threads(), "train_config": asdict(cfg), "model_shape": asdict(shape),
              "num_parameters": num_params, "vocab_size": vocab_size, "training": stats,
              "heldout": result.summary(), "heldout_failures": result.failures}
    if init is not None:
        record["earlier_stages"] = earlier_stages(init)
    (out / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
