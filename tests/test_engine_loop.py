"""The shared engine loop: requests and Self-RAG queries from many threads share model steps and get exactly
what they get alone; cancellation, deadlines and the admission bound free every block."""
from __future__ import annotations

import random
import threading

import pytest
import torch

from selfrag_engine import Engine, SamplingParams
from selfrag_engine.engine.loop import EngineLoop
from selfrag_engine.errors import Cancelled, DeadlineExceeded, QueueFullError, RequestError, SchedulingError
from selfrag_engine.selfrag.short_form import SelfRAG
from tests.helpers import tiny_checkpoint
from tests.selfrag_fixtures import passages, question, steered_engine


def _engine(**kw) -> Engine:
    return Engine.from_pretrained(tiny_checkpoint(seed=5), progress=False, **kw)


def _requests(n: int, seed: int) -> list[tuple[list[int], SamplingParams]]:
    """Random prompts with greedy and seeded-sampling params of varied lengths and stops."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randint(3, 40))]
        if i % 2:
            params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=0.0, ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=0.9, top_p=0.9,
                                    seed=rng.randrange(10 ** 6), logprobs=2)
        out.append((prompt, params))
    return out


def test_threads_get_what_they_get_alone():
    reqs = _requests(16, seed=1)
    alone = _engine()
    expected = [alone.generate(p, sp)[0] for p, sp in reqs]
    engine = _engine(max_num_seqs=6)
    got: dict[int, object] = {}
    with EngineLoop(engine) as loop:
        def client(idx: list[int]) -> None:
            handles = [(i, loop.submit(*reqs[i])) for i in idx]
            for i, h in handles:
                got[i] = h.result(timeout=120)

        threads = [threading.Thread(target=client, args=(list(range(t, 16, 4)),)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert loop.stats.steps < sum(sp.max_tokens for _, sp in reqs)  # rows of several users shared steps
        stats = loop.call(engine.cache_stats).result(10)
    for i, exp in enumerate(expected):
        assert got[i].token_ids == exp.token_ids, i
        assert got[i].text == exp.text
        assert got[i].finish_reason == exp.finish_reason
    assert stats["used"] == 0


def test_stream_deltas_add_up_to_the_output():
    engine = _engine()
    prompt, params = [5, 17, 40, 2, 99], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = _engine().generate(prompt, params)[0]
    with EngineLoop(engine) as loop:
        h = loop.submit(prompt, params)
        deltas = list(h.deltas(timeout=60))
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    assert "".join(d.text for d in deltas) == expected.text
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])


def test_async_stream_and_await():
    import asyncio

    engine = _engine()
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    expected = _engine().generate([7, 8, 9], params)[0]

    async def main(loop: EngineLoop):
        h = loop.submit([7, 8, 9], params)
        ids = [t async for d in h for t in d.token_ids]
        out = await loop.submit([7, 8, 9], params)
        return ids, out

    with EngineLoop(engine) as loop:
        ids, out = asyncio.run(main(loop))
    assert ids == expected.token_ids and out.token_ids == expected.token_ids


def test_cancel_frees_blocks_and_bad_requests_fail_their_handle():
    engine = _engine()
    with EngineLoop(engine) as loop:
        h = loop.submit(list(range(3, 60)), SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True))
        first = next(iter(h.deltas(timeout=60)))
        assert first.token_ids
        h.cancel()
        with pytest.raises(Cancelled):
            h.result(timeout=30)
        bad = loop.submit([1] * (engine.max_model_len + 5), SamplingParams(max_tokens=4))
        with pytest.raises(RequestError):
            bad.result(timeout=30)
        assert loop.call(engine.cache_stats).result(10)["used"] == 0
        assert loop.pending == 0


def test_deadline_and_admission_bound():
    engine = _engine()
    with EngineLoop(engine, max_pending=2) as loop:
        long = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
        h = loop.submit(list(range(3, 20)), long, timeout_s=0.3)
        h2 = loop.submit(list(range(3, 21)), long)
        with pytest.raises(QueueFullError):
            loop.submit([3, 4, 5], long)
        with pytest.raises(DeadlineExceeded):
            h.result(timeout=60)
        h2.cancel()
        with pytest.raises(Cancelled):
            h2.result(timeout=60)
        assert loop.pending == 0
        assert loop.call(engine.cache_stats).result(10)["used"] == 0


def test_selfrag_queries_from_threads_answer_as_alone():
    rng = random.Random(3)
    cases = [(question(rng), passages(rng, 3)) for _ in range(6)]
    alone = SelfRAG(steered_engine(), ndocs=3, max_new_tokens=12, mode="always")
    expected = [alone.answer(q, p) for q, p in cases]
    engine = steered_engine()
    with EngineLoop(engine) as loop:
        futures = [loop.run_program(lambda e, q=q, p=p: SelfRAG(e, ndocs=3, max_new_tokens=12,
                                                                mode="always").answer(q, p))
                   for q, p in cases]
        got = [f.result(timeout=300) for f in futures]
        used = loop.call(engine.cache_stats).result(10)["used"]
    for exp, ans in zip(expected, got):
        assert ans.answer == exp.answer
        assert [b.text for b in ans.branches] == [b.text for b in exp.branches]
        assert [b.final for b in ans.branches] == pytest.approx([b.final for b in exp.branches], abs=1e-6)
        assert ans.best == exp.best
    assert used == 0


class _Gate:
    """The engine view a program is handed, held at the first wait for its forked branches until the test
    opens the gate: the program is then certainly still running, holding its branches' blocks."""

    def __init__(self):
        self._inner = None
        self.held = threading.Event()
        self.go = threading.Event()
        self._forked = False

    def bind(self, inner) -> "_Gate":
        self._inner = inner
        return self

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def fork(self, *args, **kwargs):
        self._forked = True
        return self._inner.fork(*args, **kwargs)

    def _hold(self) -> None:
        if self._forked and not self.held.is_set():
            self.held.set()
            assert self.go.wait(60), "the test never opened the gate"

    def run(self, *args, **kwargs):
        self._hold()
        return self._inner.run(*args, **kwargs)

    def run_until_any(self, *args, **kwargs):
        self._hold()
        return self._inner.run_until_any(*args, **kwargs)


def test_cancelled_query_frees_its_branches():
    rng = random.Random(4)
    q, docs = question(rng), passages(rng, 4)
    engine = steered_engine()
    gate = _Gate()

    def program(e):
        return SelfRAG(gate.bind(e), ndocs=4, max_new_tokens=300, mode="always").answer(q, docs)

    with EngineLoop(engine) as loop:
        f = loop.run_program(program)
        assert gate.held.wait(60)
        assert loop.call(engine.cache_stats).result(10)["used"] > 0  # the branches hold blocks
        assert f.cancel()  # held at the gate: still running
        gate.go.set()
        with pytest.raises(Cancelled):
            f.result(timeout=60)
        assert loop.call(engine.cache_stats).result(10)["used"] == 0
        assert loop.pending == 0


def test_close_answers_a_query_waiting_on_the_loop():
    """A program still running when the loop closes fails with a named error instead of waiting forever."""
    engine = steered_engine()
    rng = random.Random(5)
    q, docs = question(rng), passages(rng, 3)
    gate = _Gate()

    def program(e):
        return SelfRAG(gate.bind(e), ndocs=3, max_new_tokens=300, mode="always").answer(q, docs)

    loop = EngineLoop(engine)
    f = loop.run_program(program)
    assert gate.held.wait(60)
    loop.close()
    gate.go.set()
    with pytest.raises(Cancelled):
        f.result(timeout=60)


def test_programs_see_the_engine_client_contract():
    """A program's view and the bare engine are both EngineClients and answer alike: a scored prompt, an
    error of a one-way operation surfacing where the program waits, a stall named instead of a hang."""
    from selfrag_engine.engine.client import EngineClient

    engine = _engine()
    alone = _engine()
    assert isinstance(alone, EngineClient)
    ids = [5, 17, 40, 2, 99, 7]
    expected = alone.score(ids)

    def scoring(e):
        assert isinstance(e, EngineClient)
        rid = e.add_request(ids, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        logits = e.score(ids)  # joins the steps of the running request
        out = e.run([rid])[0]
        return logits, out.token_ids

    def bad(e):
        rid = e.add_request([1] * (engine.max_model_len + 5), SamplingParams(max_tokens=4))  # returns at once
        return e.run([rid])

    def stalled(e):
        rid = e.add_request(ids, SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True))
        e.release(rid)  # aborted: it will never finish
        return e.run([rid])

    with EngineLoop(engine) as loop:
        logits, tokens = loop.run_program(scoring).result(120)
        with pytest.raises(RequestError):
            loop.run_program(bad).result(60)
        with pytest.raises(SchedulingError):
            loop.run_program(stalled).result(60)
        assert loop.call(engine.cache_stats).result(10)["used"] == 0
        assert loop.pending == 0
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)  # batched with another row
    assert tokens == alone.generate(ids, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0].token_ids


def test_a_handle_whose_future_a_client_cancelled_still_frees_its_slot():
    """What asyncio does when an awaiting client goes away: the handle's future is cancelled from outside,
    then the handle; the request is aborted and its admission slot and blocks are freed all the same."""
    engine = _engine()
    with EngineLoop(engine, max_pending=1) as loop:
        h = loop.submit(list(range(3, 60)), SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True))
        h.accepted.result(30)
        assert h.future.cancel()
        h.cancel()
        assert loop.call(engine.cache_stats).result(30)["used"] == 0  # runs after the abort
        assert loop.pending == 0
        again = loop.submit([3, 4, 5], SamplingParams(max_tokens=2))  # the one slot is free again
        assert len(again.result(60).token_ids) == 2


def test_a_deadline_too_far_for_a_timed_wait_keeps_the_loop_serving():
    """A client's `timeout` of 1e300 s is a deadline past what a timed wait takes: the loop still sleeps
    while idle and wakes for the next request instead of dying."""
    engine = _engine()
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    with EngineLoop(engine) as loop:
        gate = threading.Event()
        held = loop.run_program(lambda view: gate.wait(120), timeout_s=1e300)
        first = loop.submit([5, 6, 7], params, timeout_s=1e300).result(60)
        # Idle now, with far deadlines behind it; a later request is still served.
        second = loop.submit([5, 6, 7], params, timeout_s=1e300).result(60)
        assert first.token_ids == second.token_ids and len(second.token_ids) == 3
        gate.set()
        assert held.result(60) is True


def test_an_engine_built_by_the_loop_is_built_on_its_thread_and_a_failed_build_raises():
    """EngineLoop(factory) calls the factory on the loop's own thread (the thread that then steps it), returns
    once it is built, and raises what building raised."""
    built_on: list[threading.Thread] = []

    def build() -> Engine:
        built_on.append(threading.current_thread())
        return _engine()

    with EngineLoop(build) as loop:
        assert built_on == [loop._thread]
        prompt, params = [5, 17, 42, 9], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        expected = _engine().generate(prompt, params)[0]
        got = loop.submit(prompt, params).result(timeout=120)
        assert got.token_ids == expected.token_ids and got.text == expected.text

    def broken() -> Engine:
        raise FileNotFoundError("no checkpoint at /nowhere")

    with pytest.raises(FileNotFoundError, match="/nowhere"):
        EngineLoop(broken)
