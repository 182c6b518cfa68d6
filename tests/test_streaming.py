"""Streams that stream: a request's per-step deltas carry each token's text as soon as it is final, and joined
they are the non-streamed answer exactly (stop strings spanning tokens, include_stop_str_in_output, special
tokens kept or skipped, characters split over byte pieces); checked chunk by chunk, against references written
here independently of the engine's output processor (a whole-text cut at the first stop string, vLLM's
detokenizer run over the whole sequence)."""
from __future__ import annotations

import random

import pytest

from selfrag_engine import Engine, SamplingParams
from selfrag_engine.detokenizer import IncrementalDetokenizer
from selfrag_engine.engine.loop import EngineLoop
from selfrag_engine.engine.stop_strings import StopStrings
from tests.helpers import prefix_texts, spanning_stop, tiny_checkpoint, tiny_model_dir

MODEL = tiny_model_dir()
# A passage of the embedded model's world cut short: the model writes the rest of a sentence and reflection
# tokens, and (ignoring EOS) goes on for 32 tokens. What each test needs of the answer (a stop string spanning
# tokens, special tokens, tokens making text of their own) is read off the answer itself.
PROMPT = "Thastrai\nFounded in 1787, Thastrai is a"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(MODEL, progress=False)


def _stream(engine: Engine, prompt, params: SamplingParams):
    """Drives one request with `step_deltas`; returns its deltas and its (non-streamed) output."""
    rid = engine.add_request(prompt, params)
    deltas = []
    while not engine.is_done(rid):
        deltas += [d for d in engine.step_deltas() if d.request_id == rid]
    out = engine.output(rid)
    engine.forget(rid)
    return deltas, out


def _tokens_making_text(engine: Engine, out, stops: list[str] = ()) -> int:
    """How many of the answer's tokens lengthen the reference text (not skipped, not part of a character whose
    bytes are still incomplete) and leave it not ending in the beginning of a stop string: those a stream
    can hand over as soon as they are sampled."""
    texts = prefix_texts(engine, out)
    heads = {s[:j] for s in stops for j in range(1, len(s))}
    return sum(len(b) > len(a) and not b.endswith("\ufffd") and not any(b.endswith(h) for h in heads)
               for a, b in zip(texts, texts[1:]))


def _cut(text: str, stops: list[str], include: bool) -> str:
    """The reference: the whole text cut at the first stop string (earliest start, then list order)."""
    hits = [(text.find(s), i, s) for i, s in enumerate(stops) if text.find(s) >= 0]
    if not hits:
        return text
    at, _, s = min(hits)
    return text[:at + len(s)] if include else text[:at]


# ---- the pieces ---------------------------------------------------------------------------------------------


def test_stop_strings_let_through_exactly_the_cut_text():
    rng = random.Random(7)
    alphabet = "ab c\n."
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        include = rng.random() < 0.5
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        f = StopStrings(stops, include)
        out, hit = [], None
        for p in pieces:
            got, hit = f.feed(p)
            out.append(got)
            assert len(f.held) < max(map(len, stops))  # what is held never grows with the text
            if hit is not None:
                break
        if hit is None:
            out.append(f.flush())
        assert "".join(out) == _cut(text, stops, include), (text, stops, pieces)
        assert (hit is not None) == any(s in text for s in stops)


def test_detokenizer_holds_a_split_character_and_keeps_a_bounded_window():
    tok = Engine.from_pretrained(tiny_checkpoint(seed=13), progress=False).tokenizer
    byte = {b: tok.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    prompt = tok.encode("Say:")
    ids = [byte[b] for b in "日本😀".encode()]
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(t) for t in ids]
    # Each character comes whole with its last byte, never as a replacement character.
    assert pieces == ["", "", "日", "", "", "本", "", "", "", "😀"]
    words = tok.encode("the cat sat on the mat and " * 60, add_bos=False)
    detok = IncrementalDetokenizer(tok, prompt)
    text = "".join(detok.add(t) for t in words)
    assert text == tok.decode_continuation(words, prompt)
    assert len(detok.snapshot()[0]) <= 7  # the window: context and the tokens not yet emitted


# ---- the engine's deltas ------------------------------------------------------------------------------------


def test_a_32_token_answer_streams_token_by_token(engine):
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    deltas, out = _stream(engine, PROMPT, params)
    assert len(out.token_ids) == 32
    assert "".join(d.text for d in deltas) == out.text
    assert [t for d in deltas for t in d.token_ids] == out.token_ids
    # Each token that lengthens the reference text comes as text of its own, when it is sampled.
    making_text = _tokens_making_text(engine, out)
    assert sum(1 for d in deltas if d.text) == making_text
    assert making_text >= 4, f"the answer is almost all special tokens: choose another PROMPT ({out.token_ids})"
    # The first text comes with the first token, long before the end.
    assert deltas[0].text and deltas[0].token_ids == out.token_ids[:1]
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + ["length"]
    # Against vLLM's detokenizer over the whole answer (what a non-streaming vLLM returns).
    assert out.text == engine.tokenizer.decode_continuation(out.token_ids, out.prompt_token_ids)


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_spanning_tokens_streams_what_the_answer_keeps(engine, include):
    full = engine.generate(PROMPT, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))[0]
    text = full.text
    # A stop string that ends the answer, spanning its last tokens, whose beginning occurs earlier too (held
    # back, then let go).
    stop = spanning_stop(engine, full)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, stop=[stop],
                            include_stop_str_in_output=include)
    deltas, out = _stream(engine, PROMPT, params)
    assert out.text == _cut(text, [stop], include)
    assert "".join(d.text for d in deltas) == out.text
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == stop
    # Text still streams token by token: only where the text ends in the stop's beginning is it held back.
    assert sum(1 for d in deltas if d.text) >= _tokens_making_text(engine, full, [stop]) - 1


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_stream_as_the_answer_has_them(engine, skip):
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, skip_special_tokens=skip,
                            logprobs=2)
    deltas, out = _stream(engine, PROMPT, params)
    assert "".join(d.text for d in deltas) == out.text
    added = [engine.tokenizer.id_to_token(t) for t in out.token_ids if t in engine.tokenizer.added_tokens.values()]
    reflection = [t for t in added if t.startswith("[")]
    assert reflection, f"the answer holds no reflection token: choose another PROMPT ({out.token_ids})"
    assert all((t in out.text) == (not skip) for t in reflection)
    assert out.text == engine.tokenizer.decode_continuation(out.token_ids, out.prompt_token_ids,
                                                            skip_special_tokens=skip)
    if not skip:
        assert all(d.text for d in deltas)  # every token, a special one too, is text of its own
    # Log-probabilities come with the tokens they belong to.
    assert [lp for d in deltas for lp in d.token_logprobs] == out.token_logprobs
    assert [top for d in deltas for top in d.logprobs] == out.logprobs


def test_random_requests_stream_their_answers_exactly():
    """A random model that writes byte pieces (split and broken characters), random stops, several requests
    in the same steps: every request's deltas add up to its answer."""
    engine = Engine.from_pretrained(tiny_checkpoint(seed=5), progress=False)
    rng = random.Random(11)
    alone = []
    for i in range(8):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randint(3, 20))]
        base = SamplingParams(max_tokens=rng.randint(4, 24), temperature=0.8, seed=i, ignore_eos=True,
                              skip_special_tokens=bool(i % 2))
        text = engine.generate(prompt, base)[0].text
        stop = [text[len(text) // 2:len(text) // 2 + 2]] if i % 3 and len(text) > 3 else []
        alone.append((prompt, SamplingParams(**{**base.__dict__, "stop": stop,
                                                "include_stop_str_in_output": i % 4 == 1})))
    ids = {engine.add_request(p, sp): k for k, (p, sp) in enumerate(alone)}
    got: dict[int, list] = {rid: [] for rid in ids}
    while any(not engine.is_done(r) for r in ids):
        for d in engine.step_deltas():
            got[d.request_id].append(d)
    for rid, k in ids.items():
        out = engine.output(rid)
        assert out.text == engine.generate(*alone[k])[0].text
        assert "".join(d.text for d in got[rid]) == out.text, k
        assert [t for d in got[rid] for t in d.token_ids] == out.token_ids
        assert sum(d.finished for d in got[rid]) == 1 and got[rid][-1].finished


# ---- the loop's handles -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [False, True])
def test_loop_deltas_stream_token_by_token(engine, stop):
    full = engine.generate(PROMPT, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))[0]
    stops = [spanning_stop(engine, full)] if stop else []
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, stop=stops)
    with EngineLoop(Engine.from_pretrained(MODEL, progress=False)) as loop:
        h = loop.submit(PROMPT, params)
        deltas = list(h.deltas(timeout=120))
        out = h.result(10)
    assert out.text == _cut(full.text, stops, False)
    assert "".join(d.text for d in deltas) == out.text
    assert sum(1 for d in deltas if d.text) >= _tokens_making_text(engine, full, stops) - 1
    assert deltas[0].text and len(deltas[0].token_ids) == 1
