"""Structured output (engine/structured_output.py): outputs checked by readers nobody here wrote (`json`,
`jsonschema`, `re.fullmatch`), on the embedded tiny Self-RAG model and on a random test checkpoint; the bitmask
application checked against a float64 torch reference; free rows batched with constrained ones unchanged."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from selfrag_engine.backend import TORCH, TRITON, TRITON_INTERPRETED
from selfrag_engine.engine import structured_output
from selfrag_engine.engine.llm_engine import Engine
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.engine.structured_output import (Grammars, StructuredOutput, apply_bitmask, constrain,
                                                     fill_bitmask, mask_backend, xgrammar_vocab)
from selfrag_engine.errors import RequestError
from selfrag_engine.layers.sampler import sample
from selfrag_engine.tokenizer import Tokenizer
from tests.helpers import record_preemptions, tiny_checkpoint

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

# An instruction of the embedded model that needs no facts: under every grammar below, greedy and sampled, the
# model closes its output within 64 tokens (asked about the world instead, it can write a JSON string that
# never ends, a phrase repeated, which is the model's, not the grammar's, doing).
PROMPT = "### Instruction:\nWho are you?\n\n### Response:\n"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
        "genre": {"enum": ["novel", "poem", "essay"]},
    },
    "required": ["name", "year", "genre"],
}
REGEX = r"[A-Z][a-z]{1,8} (is|was) [0-9]{1,3}"
CHOICES = ["yes", "no", "it is \"unclear\""]
KV = 1 << 24


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny", device="cpu", progress=False, kv_cache_bytes=KV)


@pytest.fixture(scope="module")
def ckpt_engine():
    return Engine.from_pretrained(tiny_checkpoint(seed=5), device="cpu", progress=False, kv_cache_bytes=KV)


def _params(structured=None, temperature=0.0, seed=7, max_tokens=48, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, structured=structured, **kw)


def _no_leak(eng: Engine) -> None:
    stats = eng.cache_stats()
    assert stats["used"] == 0, stats


# ---- outputs that parse, validate, match ------------------------------------------------------------------

# One batch: free rows beside constrained rows of every kind, greedy and sampled. The free rows and the Self-RAG
# row ask for reflection scores and log-probabilities.
ROWS = [
    ("free greedy", None, 0.0),
    ("json greedy", StructuredOutput(json=SCHEMA), 0.0),
    ("json sampled", StructuredOutput(json=json.dumps(SCHEMA)), 1.0),
    ("free sampled", None, 0.9),
    ("json_object greedy", StructuredOutput(json_object=True), 0.0),
    ("regex greedy", StructuredOutput(regex=REGEX), 0.0),
    ("regex sampled", StructuredOutput(regex=REGEX), 1.0),
    ("choice sampled", StructuredOutput(choice=CHOICES), 1.0),
    ("choice greedy", StructuredOutput(choice=["yes", "no"]), 0.0),
]
FREE_TOKENS = 8


def _row_params(i: int) -> SamplingParams:
    _, so, temperature = ROWS[i]
    return _params(so, temperature, seed=31 + i, max_tokens=FREE_TOKENS if so is None else 64,
                   reflection=True, logprobs=3)


@pytest.fixture(scope="module")
def mixed(engine):
    calls = []
    real = structured_output.apply_bitmask
    structured_output.apply_bitmask = lambda logits, *a: calls.append(logits.shape[0]) or real(logits, *a)
    try:
        outs = engine.generate([PROMPT] * len(ROWS), [_row_params(i) for i in range(len(ROWS))])
    finally:
        structured_output.apply_bitmask = real
    return {name: out for (name, _, _), out in zip(ROWS, outs)}, calls


def test_one_mask_application_per_step_over_the_constrained_rows(mixed):
    outs, calls = mixed
    lengths = sorted(len(outs[name].token_ids) for name, so, _ in ROWS if so is not None)
    # Every prompt is prefilled in the first step, so step k samples every row still running at k.
    assert len(calls) == lengths[-1]
    assert calls == [sum(n > k for n in lengths) for k in range(lengths[-1])]


def test_constrained_outputs_parse_validate_and_match(engine, mixed):
    mixed = mixed[0]
    for name, so, _ in ROWS:
        if so is not None:  # each grammar ended its output with EOS
            assert mixed[name].finish_reason == "stop" and mixed[name].stop_reason is None, (name, mixed[name].text)
    for name in ("json greedy", "json sampled"):
        jsonschema.validate(json.loads(mixed[name].text), SCHEMA)
    assert isinstance(json.loads(mixed["json_object greedy"].text), dict)
    for name in ("regex greedy", "regex sampled"):
        assert re.fullmatch(REGEX, mixed[name].text), mixed[name].text
    assert mixed["choice sampled"].text in CHOICES and mixed["choice greedy"].text in ("yes", "no")
    _no_leak(engine)


def test_free_rows_unchanged_beside_constrained_rows(engine, mixed):
    mixed = mixed[0]
    free = [i for i, (_, so, _) in enumerate(ROWS) if so is None]
    alone = engine.generate([PROMPT] * len(free), [_row_params(i) for i in free])
    for i, a in zip(free, alone):
        m = mixed[ROWS[i][0]]
        assert m.token_ids == a.token_ids and m.text == a.text
        assert m.token_logprobs == pytest.approx(a.token_logprobs, abs=1e-5)
    # A constrained row alone gets the tokens it gets in the batch: its draws are keyed by its seed and step.
    i = next(i for i, (name, _, _) in enumerate(ROWS) if name == "regex sampled")
    assert engine.generate(PROMPT, _row_params(i))[0].token_ids == mixed["regex sampled"].token_ids
    _no_leak(engine)


def test_test_checkpoint_byte_fallback_vocabulary(ckpt_engine):
    """A random checkpoint whose 320-piece vocabulary spells many characters with <0x..> byte tokens."""
    tok = ckpt_engine.tokenizer
    assert any(tok.id_to_token(i).startswith("<0x") for i in range(tok.num_pieces))
    regex = r"\{[0-9]{2}\}é?"
    specs = [StructuredOutput(json=SCHEMA), StructuredOutput(regex=regex), StructuredOutput(choice=CHOICES)]
    outs = ckpt_engine.generate([PROMPT] * 3, [_params(s, 1.0, seed=3 + i, max_tokens=80) for i, s in enumerate(specs)])
    assert all(o.finish_reason == "stop" for o in outs), [(o.text, o.finish_reason) for o in outs]
    jsonschema.validate(json.loads(outs[0].text), SCHEMA)
    assert re.fullmatch(regex, outs[1].text)
    assert outs[2].text in CHOICES
    _no_leak(ckpt_engine)


def test_xgrammar_vocab_reads_pieces_as_text(engine):
    tok: Tokenizer = engine.tokenizer
    vocab = xgrammar_vocab(tok)
    assert len(vocab) == tok.vocab_size
    # Special and added tokens (the reflection tokens) never match text; pieces are passed as they are.
    ids = tok.reflection_token_ids()
    assert all(vocab[i] == "" for g in ids.groups().values() for i in g)
    assert vocab[tok.eos_id] == vocab[tok.bos_id] == ""
    space_piece = next(i for i in range(tok.num_pieces) if tok.id_to_token(i).startswith("▁") and len(tok.id_to_token(i)) > 2)
    assert vocab[space_piece] == tok.id_to_token(space_piece)
    # What the matcher accepts is what the detokenizer writes: "▁word" is " word", "<0x41>" is "A".
    matcher = xgr.GrammarMatcher(engine.requests.grammars.compiled(
        StructuredOutput(regex=re.escape(" " + tok.id_to_token(space_piece)[1:]) + "A")))
    assert matcher.accept_token(space_piece) and matcher.accept_token(tok.token_to_id("<0x41>"))
    assert matcher.is_completed()


def test_preempted_and_forked_constrained_requests(ckpt_engine):
    """A constrained request preempted and recomputed from its tokens keeps its matcher; branches forked off a
    cached prompt each get their own."""
    regex = r"[a-z]{3}( [0-9]{2}){3}"
    prompts = [PROMPT.replace("river", word) for word in ("river", "stone", "field", "tower")]
    params = [_params(StructuredOutput(regex=regex), 1.0, seed=40 + i, max_tokens=20)
              if i % 2 else _params(None, 1.0, seed=40 + i, max_tokens=10) for i in range(len(prompts))]
    roomy = ckpt_engine.generate(prompts, params)
    # Two prompts fill the pool: their decoding must take turns.
    prompt_blocks = -(-max(len(ckpt_engine.tokenizer.encode(p)) for p in prompts) // 8)
    tight = Engine.from_pretrained(tiny_checkpoint(seed=5), device="cpu", progress=False,
                                   num_blocks=2 * prompt_blocks, block_size=8, enable_prefix_caching=False)
    preempted = record_preemptions(tight)
    outs = tight.generate(prompts, params)
    assert preempted, "the pool was meant to be too small to hold every request at once"
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert all(re.fullmatch(regex, o.text) for o in outs[1::2])
    _no_leak(tight)

    parent = ckpt_engine.add_request(PROMPT, _params(None, max_tokens=1), keep_cache=True)
    ckpt_engine.run([parent])
    kids = ckpt_engine.fork(parent, ["Answer:", "Choose:"], _params(StructuredOutput(choice=CHOICES), 1.0, seed=2),
                            prefix_len=len(ckpt_engine.tokenizer.encode(PROMPT)))
    ckpt_engine.release(parent)
    assert all(o.text in CHOICES and o.finish_reason == "stop" for o in ckpt_engine.run(kids))
    for rid in (parent, *kids):
        ckpt_engine.forget(rid)
    _no_leak(ckpt_engine)


# ---- speculation and overlap step aside ---------------------------------------------------------------------


def test_speculation_and_overlap_step_aside_for_constrained_rows(engine):
    """The engine options a GPU turns on by default, run on the CPU: a speculating engine drafts the free rows
    only, an overlapping one launches no step ahead of a constrained row, and both give the plain outputs."""
    params = [_params(None, 0.0, max_tokens=FREE_TOKENS), _params(StructuredOutput(regex="[0-9]{4}"), 1.0, seed=3),
              _params(None, 1.0, seed=4, max_tokens=FREE_TOKENS), _params(StructuredOutput(choice=CHOICES), 0.0)]
    prompt = "the river and the stone, the river and the stone, the river and the"  # drafts to copy
    plain = engine.generate([prompt] * 4, params)
    spec = Engine(engine.model, engine.tokenizer, kv_cache_bytes=KV, num_draft_tokens=3)
    assert [o.token_ids for o in spec.generate([prompt] * 4, params)] == [o.token_ids for o in plain]
    stats = spec.speculation_stats()
    assert stats["drafted"] > 0  # the free rows did speculate
    only = Engine(engine.model, engine.tokenizer, kv_cache_bytes=KV, num_draft_tokens=3)
    assert only.generate(prompt, params[3])[0].token_ids == plain[3].token_ids
    assert only.speculation_stats()["drafted"] == 0 and only.speculation_stats()["verify_passes"] == 0
    ahead = Engine(engine.model, engine.tokenizer, kv_cache_bytes=KV, overlap=True)
    assert ahead.overlap
    assert [o.token_ids for o in ahead.generate([prompt] * 4, params)] == [o.token_ids for o in plain]
    for e in (spec, only, ahead):
        _no_leak(e)


# ---- Self-RAG: the reflection groups and the scores stay those of the raw logits -----------------------------


def test_reflection_probabilities_readable_under_a_grammar(engine, mixed):
    mixed = mixed[0]
    constrained, free = mixed["choice greedy"], mixed["free greedy"]
    groups = engine.reflection_groups
    probs = constrained.reflection_probs
    assert probs is not None and probs.shape == (len(constrained.token_ids), groups.num_tokens)
    # The first step reads the same logits with or without the grammar: the same reflection scores.
    torch.testing.assert_close(probs[0], free.reflection_probs[0])
    for name in groups.names:
        torch.testing.assert_close(probs[:, groups.span(name)].sum(-1), torch.ones(len(probs)))
    # The chosen token's log-probability and the top-n are of the unmasked logits: the prompt's last
    # position, scored.
    logprobs = torch.log_softmax(engine.score(engine.tokenizer.encode(PROMPT))[-1].double(), -1)
    first = constrained.token_ids[0]
    assert constrained.token_logprobs[0] == pytest.approx(float(logprobs[first]), abs=1e-4)
    assert set(torch.topk(logprobs, 3).indices.tolist()) <= set(constrained.logprobs[0])
    assert free.token_ids[0] in constrained.logprobs[0]  # greedy's free token, masked out of the draw
    _no_leak(engine)


def test_a_failed_step_rolls_the_grammar_back(engine, monkeypatch):
    """A step that raises after a constrained row's token was appended leaves its matcher as before the step,
    so the request carries on to the output it gets uninterrupted."""
    from selfrag_engine.engine import stepping

    params = _params(StructuredOutput(regex=REGEX), 1.0, seed=5)
    ref = engine.generate(PROMPT, params)[0]
    rid = engine.add_request(PROMPT, params)
    real, calls = stepping.append_token, []

    def failing(seq, *args, **kwargs):
        done = real(seq, *args, **kwargs)
        calls.append(seq.request_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return done

    monkeypatch.setattr(stepping, "append_token", failing)
    with pytest.raises(KeyboardInterrupt):
        engine.run([rid])
    monkeypatch.undo()
    assert engine.requests.get(rid).grammar.num_accepted == 2
    out = engine.run([rid])[0]
    assert out.token_ids == ref.token_ids and re.fullmatch(REGEX, out.text)
    engine.forget(rid)
    _no_leak(engine)


# ---- the bitmask, against a float64 reference ---------------------------------------------------------------


def _reference_mask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[1]
    bits = (bitmask.to(torch.int64).unsqueeze(-1) >> torch.arange(32)) & 1
    allowed = bits.flatten(1)[:, :vocab].bool()
    return torch.where(allowed, logits.double(), float("-inf"))


def test_bitmask_application_matches_float64_reference():
    g = torch.Generator().manual_seed(1234)
    rows, vocab = 5, 2416 + 9  # a width that is not a multiple of 32
    logits = torch.randn(rows, vocab, generator=g) * 4
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (rows, words), generator=g, dtype=torch.int64).to(torch.int32)
    bitmask[0] = -1  # a row that allows everything
    ref = _reference_mask(logits, bitmask)
    for backend in (TORCH, TRITON_INTERPRETED):
        out = logits.clone()
        apply_bitmask(out, bitmask, backend)
        assert torch.equal(out.double(), ref)
    # The torch implementation xgrammar runs for the torch path on CUDA, here on the CPU's tensors.
    out = logits.clone()
    xgr.apply_token_bitmask_inplace(out, bitmask, vocab_size=vocab, backend="torch_native")
    assert torch.equal(out.double(), ref)


def test_mask_backend_follows_the_engine_backend():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert mask_backend(TORCH, cpu) == mask_backend(TRITON_INTERPRETED, cpu) == "cpu"
    assert mask_backend(TRITON, cuda) == "triton"
    assert mask_backend(TORCH, cuda) == "torch_native"


@pytest.mark.parametrize("backend", [TORCH, TRITON_INTERPRETED], ids=["torch", "triton-interpreted"])
def test_constrain_redraws_only_the_rows_with_a_grammar(engine, backend):
    g = torch.Generator().manual_seed(99)
    tok = engine.tokenizer
    vocab = engine.config.vocab_size
    grammars = Grammars(tok, vocab)
    states = [None, grammars.state(StructuredOutput(regex="[0-9]+ apples")), None,
              grammars.state(StructuredOutput(choice=["yes", "no"]))]
    logits = torch.randn(4, vocab, generator=g) * 3
    temperature = torch.tensor([0.0, 0.0, 1.0, 1.0])
    top_p, top_k = torch.tensor([1.0, 1.0, 0.9, 1.0]), torch.tensor([0, 0, 50, 0], dtype=torch.int32)
    seeds = torch.tensor([1, 2, 3, 4])
    plain = sample(logits, temperature, top_p, top_k, seeds, backend=backend)
    out = constrain(logits, states, sample(logits, temperature, top_p, top_k, seeds, backend=backend), temperature,
                    top_p, top_k, seeds, backend)
    for i in (0, 2):  # untouched
        assert out.tokens[i] == plain.tokens[i] and out.logprobs[i] == plain.logprobs[i]
    bitmask = fill_bitmask([states[1], states[3]], vocab)
    masked = _reference_mask(logits[[1, 3]], bitmask)
    assert out.tokens[1] == masked[0].argmax()  # greedy: the best allowed token
    assert torch.isfinite(masked[1, out.tokens[3]])  # sampled: an allowed token
    raw = torch.log_softmax(logits.double(), -1)
    for i in (1, 3):
        assert float(out.logprobs[i]) == pytest.approx(float(raw[i, out.tokens[i]]), abs=1e-5)
    assert constrain(logits, [None] * 4, plain, temperature, top_p, top_k, seeds, backend) is plain


def test_eos_is_allowed_only_where_the_grammar_may_end(engine):
    tok = engine.tokenizer
    grammars = Grammars(tok, engine.config.vocab_size)
    state = grammars.state(StructuredOutput(choice=["no", "none"]))

    def allows_eos() -> bool:
        return bool(_reference_mask(torch.zeros(1, engine.config.vocab_size),
                                    fill_bitmask([state], engine.config.vocab_size))[0, tok.eos_id] == 0)

    assert not allows_eos()
    for piece in ("n", "o"):
        assert state.accept(tok.token_to_id(piece) if piece in xgrammar_vocab(tok) else tok.token_to_id(f"<0x{ord(piece):02X}>"))
    assert state.completed and allows_eos()  # "no" is whole, and "none" may still follow
    assert state.accept(tok.eos_id) and not state.accept(tok.eos_id)  # ended: nothing more is taken


# ---- bad requests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(json={"type": "nonsense"}), "invalid json schema: Unsupported type"),
    (dict(json="{not json"), "json schema is not valid JSON"),
    (dict(json="[1, 2]"), "a json schema is a JSON object"),
    (dict(regex="a(b"), "invalid regex"),
    (dict(grammar="root ::= "), "invalid grammar"),
    (dict(choice=[]), "choice must be a non-empty list"),
    (dict(choice=["a", ""]), "choice strings must be non-empty"),
    (dict(choice="yes"), "choice must be a non-empty list"),
    (dict(regex="a", choice=["a"]), "exactly one of"),
    (dict(), "exactly one of json, json_object, regex, choice, grammar; got none"),
    (dict(json_object="yes"), "json_object must be True or False"),
    (dict(json=3), "json must be a JSON schema"),
])
def test_bad_constraints_are_request_errors(kwargs, message):
    with pytest.raises(RequestError, match=re.escape(message)):
        StructuredOutput(**kwargs)


def test_bad_structured_params_are_request_errors(engine):
    with pytest.raises(RequestError, match="unknown field"):
        SamplingParams(structured={"json_schema": SCHEMA})
    with pytest.raises(RequestError, match="structured must be a StructuredOutput"):
        SamplingParams(structured="json")
    with pytest.raises(RequestError, match="ignore_eos cannot be combined"):
        SamplingParams(structured=StructuredOutput(json_object=True), ignore_eos=True)
    params = SamplingParams(structured=StructuredOutput(json_object=True))
    params.ignore_eos = True  # set after the check: refused when the request is made
    with pytest.raises(RequestError, match="ignore_eos cannot be combined"):
        engine.add_request(PROMPT, params)
    # A dict of the fields is taken as one.
    assert SamplingParams(structured={"regex": "a+"}).structured == StructuredOutput(regex="a+")
    with pytest.raises(RequestError, match="invalid regex"):
        engine.add_request(PROMPT, SamplingParams(structured={"regex": "(("}))
    assert not engine.has_work()
    _no_leak(engine)


def test_without_xgrammar_only_a_structured_request_fails(engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # as if not installed
    assert engine.generate(PROMPT, _params(None, max_tokens=2))[0].finish_reason == "length"
    with pytest.raises(RequestError, match="structured output needs the xgrammar package"):
        SamplingParams(structured=StructuredOutput(regex="never [0-9] parsed before"))


def test_compiled_grammars_are_cached_per_kind_and_spec(engine):
    grammars = engine.requests.grammars
    a = grammars.compiled(StructuredOutput(json=SCHEMA))
    assert grammars.compiled(StructuredOutput(json=dict(SCHEMA))) is a
    assert grammars.compiled(StructuredOutput(regex="[0-9]+")) is not a


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_constrained_decoding_on_the_gpu_kernels():
    from tests.helpers import GPU_KV_CACHE_BYTES

    eng = Engine.from_pretrained("tiny", device="cuda", progress=False, kv_cache_bytes=GPU_KV_CACHE_BYTES)
    assert eng.backend == TRITON
    specs = [None, StructuredOutput(json=SCHEMA), StructuredOutput(regex=REGEX), StructuredOutput(choice=CHOICES)]
    outs = eng.generate([PROMPT] * 4, [_params(s, 1.0, seed=5 + i, max_tokens=64) for i, s in enumerate(specs)])
    jsonschema.validate(json.loads(outs[1].text), SCHEMA)
    assert re.fullmatch(REGEX, outs[2].text) and outs[3].text in CHOICES
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 32000 + 5, generator=g)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, (32005 + 31) // 32), generator=g, dtype=torch.int64).to(torch.int32)
    out = logits.cuda()
    apply_bitmask(out, bitmask, TRITON)
    assert torch.equal(out.cpu().double(), _reference_mask(logits, bitmask))
    _no_leak(eng)
