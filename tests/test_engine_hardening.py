"""The engine under misuse: forks of half-prefilled requests, exceptions inside a step, engines that could
never schedule anything, bad prompts, and two threads on one engine. Each test compares against the same
requests run alone on an untouched engine."""
import threading

import numpy as np
import pytest
import torch

import selfrag_engine.engine.stepping as stepping
from selfrag_engine import Engine, RequestError, SamplingParams
from selfrag_engine.errors import DeviceError, EngineConfigError, SchedulingError
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def path():
    return tiny_checkpoint(seed=41, num_key_value_heads=2)


@pytest.fixture(scope="module")
def ref(path):
    return Engine.from_pretrained(path, progress=False)


def _greedy(n=8, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def _prompts(seed: int, n: int, lo: int = 3, hi: int = 30) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 200, (int(k),), generator=gen).tolist()
            for k in torch.randint(lo, hi, (n,), generator=gen)]


def _tokens(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


def test_fork_of_a_parent_still_prefilled_in_chunks_is_refused_and_later_matches_alone(path, ref):
    engine = Engine.from_pretrained(path, progress=False, max_num_batched_tokens=16, block_size=8)
    prompt = _prompts(1, 1, 40, 41)[0]
    parent = engine.add_request(prompt, _greedy(1), keep_cache=True)
    engine.step()  # the first 16 of the prompt's 41 tokens
    assert not engine.is_done(parent)
    before = engine.cache_stats()
    with pytest.raises(RequestError, match="still being prefilled"):
        engine.fork(parent, [[7, 8]], _greedy(6))
    assert engine.cache_stats() == before and len(engine.seqs) == 1
    engine.run([parent])
    suffixes = [[7, 8], [9]]
    kids = engine.fork(parent, suffixes, _greedy(6), prefix_len=len(prompt))
    engine.release(parent)
    alone = ref.generate([prompt + s for s in suffixes], _greedy(6))
    assert _tokens(engine.run(kids)) == _tokens(alone)
    for k in kids:
        engine.forget(k)
    engine.forget(parent)
    assert engine.cache_stats()["used"] == 0


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("where", ["model", "sampler-interrupt"])
def test_an_exception_inside_a_step_leaves_every_request_as_before(path, ref, monkeypatch, overlap, where):
    prompts = _prompts(2, 4)
    params = [_greedy(10), SamplingParams(max_tokens=10, temperature=0.8, seed=5, ignore_eos=True)] * 2
    expected = ref.generate(prompts, params)
    engine = Engine.from_pretrained(path, progress=False, overlap=overlap, max_num_batched_tokens=24)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    calls = {"n": 0}
    if where == "model":
        run = engine.runner.run

        def failing(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 4:
                raise RuntimeError("device fault")
            return run(*a, **kw)
        monkeypatch.setattr(engine.runner, "run", failing)
        error = RuntimeError
    else:
        sample = stepping.sample_rows

        def interrupted(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return sample(*a, **kw)
        monkeypatch.setattr(stepping, "sample_rows", interrupted)
        error = KeyboardInterrupt
    with pytest.raises(error):
        engine.run(ids)
    assert calls["n"] >= 3
    outs = engine.run(ids)  # carries on from where every request was before the failed step
    assert _tokens(outs) == _tokens(expected)
    assert [o.token_logprobs for o in outs] == [pytest.approx(o.token_logprobs, abs=1e-5) for o in expected]
    for i in ids:
        engine.forget(i)
    assert engine.cache_stats()["used"] == 0
    engine.scheduler.block_manager.check_invariants()


def test_a_bad_parameter_that_slips_past_validation_is_refused_or_raises_without_spinning(path):
    engine = Engine.from_pretrained(path, progress=False)
    params = SamplingParams(max_tokens=4, top_k=5)
    params.top_k = 2**40  # as if the dataclass had let it through
    with pytest.raises(RequestError, match="top_k"):
        engine.add_request([1, 5, 6], params)
    params.top_k, params.logprobs = 5, 0  # served: only the chosen token's log-probability
    out = engine.generate([[1, 5, 6]], params)[0]
    assert [list(d) for d in out.logprobs] == [[t] for t in out.token_ids]
    ok = engine.add_request([1, 7, 8], _greedy(3))
    late = SamplingParams(max_tokens=4)
    bad = engine.add_request([1, 5, 6], late)
    late.top_k = 2**40  # changed after the request was made: every step that samples it fails
    for _ in range(2):
        with pytest.raises(RuntimeError):
            engine.run([ok, bad])
    assert not engine.is_done(ok)
    engine.release(bad)
    assert len(engine.run([ok])[0].token_ids) == 3
    for i in (ok, bad):
        engine.forget(i)
    assert engine.cache_stats()["used"] == 0


def test_engine_options_that_can_never_schedule_are_refused(path):
    for kw in ({"max_num_seqs": 0}, {"max_num_batched_tokens": 0}, {"block_size": 0}, {"num_blocks": 0},
               {"max_num_seqs": True}, {"block_size": -16}):
        with pytest.raises(EngineConfigError, match=next(iter(kw))):
            Engine.from_pretrained(path, progress=False, **kw)


def test_run_raises_when_nothing_can_make_progress(path):
    engine = Engine.from_pretrained(path, progress=False)
    rid = engine.add_request([1, 5, 6], _greedy(3))
    engine.scheduler.remove(engine.seqs[rid])  # a request that no step will ever pick up
    with pytest.raises(SchedulingError, match="cannot make progress"):
        engine.run([rid])
    with pytest.raises(SchedulingError):
        engine.run_until_any([rid])


def test_prompt_validation(path, ref):
    with pytest.raises(RequestError, match="empty prompt"):
        ref.generate("")
    with pytest.raises(RequestError, match="empty prompt"):
        ref.add_request([])
    for bad in ([1, 2.0, 3], [1, True], [1, 2.7], [1, None]):
        with pytest.raises(RequestError, match="integers"):
            ref.add_request(bad, _greedy())
    parent = ref.add_request([1, 5, 6], _greedy(1), keep_cache=True)
    ref.run([parent])
    for bad in ([[1.5]], [[False]]):
        with pytest.raises(RequestError, match="integers"):
            ref.fork(parent, bad, _greedy())
    with pytest.raises(RequestError, match="unknown request id"):
        ref.fork(parent + 100, [[5]], _greedy())
    ref.forget(parent)
    # Integers of every kind are token ids.
    a = ref.generate([np.array([1, 5, 6]), torch.tensor([1, 5, 6]), [1, 5, 6]], _greedy(4))
    assert a[0].token_ids == a[1].token_ids == a[2].token_ids
    assert len(ref.seqs) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_named_error(path):
    with pytest.raises(DeviceError, match="CUDA is not available"):
        Engine.from_pretrained(path, device="cuda", progress=False)


def test_two_threads_sharing_one_engine_through_its_loop_get_what_each_gets_alone(path, ref):
    """An Engine has one owner; threads share it through an EngineLoop, whose thread alone steps it."""
    from selfrag_engine.engine.loop import EngineLoop

    jobs = [(_prompts(10 + t, 3), [_greedy(12), SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9,
                                                                  seed=t, ignore_eos=True), _greedy(5)])
            for t in range(3)]
    expected = [_tokens(ref.generate(p, sp)) for p, sp in jobs]
    engine = Engine.from_pretrained(path, progress=False, max_num_batched_tokens=32, num_blocks=40, block_size=8)
    with EngineLoop(engine) as loop:
        for trial in range(3):
            results: dict[int, object] = {}

            def work(t: int) -> None:
                try:
                    handles = [loop.submit(p, sp) for p, sp in zip(*jobs[t])]
                    results[t] = [h.result(120).token_ids for h in handles]
                except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                    results[t] = e
            threads = [threading.Thread(target=work, args=(t,)) for t in range(len(jobs))]
            for th in threads:
                th.start()
            for th in threads:
                th.join(timeout=120)
            assert [results.get(t) for t in range(len(jobs))] == expected, f"trial {trial}"
            assert loop.call(engine.cache_stats).result(10)["used"] == 0
            assert loop.call(lambda: not engine.seqs).result(10)
