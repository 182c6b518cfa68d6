"""Overlapped stepping (`Engine(overlap=True)`): each decode step is launched before the previous step's tokens
reach the host. Every request must get exactly what it gets from plain steps, whatever stops it, and the
cache must end as plain steps leave it. On the CPU the steps do not really overlap, but the bookkeeping
(reserved slots, dropped rows, cancelled steps) is the same code."""
import pytest
import torch

from selfrag_engine import Engine, SamplingParams
from tests.helpers import GPU_KV_CACHE_BYTES, tiny_checkpoint


@pytest.fixture(scope="module")
def path():
    return tiny_checkpoint(seed=31, num_key_value_heads=2)


def make_engine(path, overlap: bool, **kw) -> Engine:
    """An engine whose KV pool starts as NaN, so a read of a slot nobody wrote cannot go unnoticed, and that
    counts the steps it launched ahead."""
    if "num_blocks" not in kw:
        kw.setdefault("kv_cache_bytes", GPU_KV_CACHE_BYTES)
    engine = Engine.from_pretrained(path, progress=False, overlap=overlap, **kw)
    for cache in engine.kv_caches:
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))
    engine.ahead_steps = 0
    schedule_ahead = engine.scheduler.schedule_ahead

    def counting(seqs):
        batch = schedule_ahead(seqs)
        engine.ahead_steps += batch is not None
        return batch

    engine.scheduler.schedule_ahead = counting
    return engine


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert (x.finish_reason, x.stop_reason, x.text) == (y.finish_reason, y.stop_reason, y.text)
        assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=1e-5)
        assert x.logprobs == y.logprobs or all(
            p.keys() == q.keys() and all(abs(p[k] - q[k]) < 1e-5 for k in p) for p, q in zip(x.logprobs, y.logprobs))
        if x.reflection_probs is None:
            assert y.reflection_probs is None
        else:
            assert torch.allclose(x.reflection_probs, y.reflection_probs, atol=1e-6)


def mixed_requests(ref: Engine):
    """Prompts and sampling params that end every way a request can end, at different steps."""
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 200, (int(n),), generator=gen).tolist() for n in torch.randint(2, 40, (8,),
                                                                                             generator=gen)]
    greedy = ref.generate(prompts, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    stop_tok = greedy[1].token_ids[6]
    stop_str = greedy[2].text[len(greedy[2].text) // 2:][:2]
    params = [
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_tok]),
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop_str] if stop_str.strip() else None),
        SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=25, temperature=1.0, top_p=0.9, seed=11, reflection=True),
        SamplingParams(max_tokens=30, temperature=0.8, top_k=20, seed=12, logprobs=2),
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=30, temperature=1.5, seed=13),  # EOS likely somewhere: it may stop early
    ]
    return prompts, params


def test_overlapped_steps_give_every_request_what_plain_steps_give(path):
    prompts, params = mixed_requests(make_engine(path, False))
    plain, over = make_engine(path, False), make_engine(path, True)
    a = plain.generate(prompts, params)
    b = over.generate(prompts, params)
    assert_same(a, b)
    assert plain.ahead_steps == 0 and over.ahead_steps > 20
    assert any(o.finish_reason == "stop" for o in b) and any(o.finish_reason == "length" for o in b)
    for engine in (plain, over):
        engine.scheduler.block_manager.check_invariants()
        assert engine.cache_stats()["used"] == 0
    # Blocks completed by tokens that were committed after their step ran are cached as plain steps cache them.
    assert over.cache_stats()["cached"] == plain.cache_stats()["cached"]
    # Requests arriving while a step is in flight join at the next plain step.
    again = [over.add_request(p, sp) for p, sp in zip(prompts[:3], params[:3])]
    over.step()
    late = [over.add_request(p, sp) for p, sp in zip(prompts[3:], params[3:])]
    assert_same(over.run(again + late), plain.generate(prompts, params))


def test_forks_and_releases_while_a_step_is_in_flight(path):
    """The Self-RAG pattern under overlap: a prompt decodes beside other requests, branches fork off it while
    it still runs (cancelling the step launched ahead), and it is released mid-decode."""
    outs = []
    for overlap in (False, True):
        engine = make_engine(path, overlap)
        prompt = list(range(5, 60))
        other = engine.add_request(list(range(100, 130)), SamplingParams(max_tokens=40, temperature=0.0,
                                                                          ignore_eos=True))
        parent = engine.add_request(prompt, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
                                    keep_cache=True)
        for _ in range(6):
            engine.step()
        assert engine.seqs[parent].status.value == "running"
        kids = engine.fork(parent, [[7 + i] * (i + 1) for i in range(5)],
                           SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1))
        for _ in range(3):
            engine.step()
        engine.release(parent)
        res = engine.run(kids + [other])
        outs.append(res + [engine.output(parent)])
        engine.scheduler.block_manager.check_invariants()
        assert engine.cache_stats()["used"] == 0
        if overlap:
            assert engine.ahead_steps > 10
    assert_same(outs[0], outs[1])


def test_paused_branches_keep_only_their_computed_tokens(path):
    """A request kept for forking that stops while the next step is in flight gives that step's slot back, so
    forking it later, dropping its last token, reads and caches exactly what plain steps would."""
    prompts = [list(range(3 + i, 40 + i)) for i in range(3)]
    greedy = make_engine(path, False).generate(prompts, SamplingParams(max_tokens=30, temperature=0.0,
                                                                       ignore_eos=True))
    # Each stops on a token it samples at a different step, which the step launched ahead cannot foresee.
    stops = [g.token_ids[4 + 5 * i] for i, g in enumerate(greedy)]
    outs = []
    for overlap in (False, True):
        engine = make_engine(path, overlap)
        parents = [engine.add_request(p, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                                        stop_token_ids=[t]), keep_cache=True)
                   for p, t in zip(prompts, stops)]
        assert all(o.finish_reason == "stop" for o in engine.run(parents))
        if overlap:
            assert engine.ahead_steps > 5
        for p in parents:
            seq = engine.seqs[p]
            assert engine.scheduler.block_manager.num_tokens(p) == seq.num_computed == len(seq.token_ids) - 1
            assert engine.scheduler.block_manager.num_reserved(p) == 0
        kids = [k for p in parents for k in engine.fork(p, [[9, 9], [11]], SamplingParams(max_tokens=8,
                                                                                        temperature=0.0),
                                                           prefix_len=len(engine.seqs[p].token_ids) - 1)]
        for p in parents:
            engine.release(p)
        outs.append(engine.run(kids))
        engine.scheduler.block_manager.check_invariants()
        assert engine.cache_stats()["used"] == 0
    assert_same(outs[0], outs[1])


def test_tight_pool_falls_back_to_plain_steps_and_preempts(path):
    prompts = [list(range(10 + i, 30 + 5 * i)) for i in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=1)
    roomy = make_engine(path, False)
    longest = max(len(p) for p in prompts) + 40
    tight = make_engine(path, True, num_blocks=-(-longest // 8) + 2, block_size=8)
    assert_same(roomy.generate(prompts, params), tight.generate(prompts, params))
    tight.scheduler.block_manager.check_invariants()
    assert tight.cache_stats()["used"] == 0 and tight.ahead_steps > 0


def test_overlap_defaults_to_cuda_only(path):
    assert Engine.from_pretrained(path, progress=False).overlap is False


def test_selfrag_answers_are_unchanged_by_overlap():
    from selfrag_engine.selfrag.short_form import SelfRAG
    from selfrag_engine.tiny.assets import default_model_dir
    from selfrag_engine.tiny.evaluate import _passages, world_and_split, world_cases

    model = default_model_dir()
    if not (model / "model.safetensors").is_file():
        pytest.skip("tiny_selfrag not present")
    world, split = world_and_split()
    cases = world_cases(world, split, 12, seed=4)
    questions = [c.question.text for c in cases] + ["What is 3 plus 4?", "Say hello to Vitrak Rovraitre."]
    passages = [_passages(c.passages) for c in cases] + [_passages(cases[0].passages)] * 2
    answers = []
    for overlap in (False, True):
        engine = make_engine(model, overlap)
        answers.append(SelfRAG(engine, max_new_tokens=40).answer_batch(questions, passages))
        assert engine.cache_stats()["used"] == 0
        engine.scheduler.block_manager.check_invariants()
        if overlap:
            assert engine.ahead_steps > 5
    for x, y in zip(*answers):
        assert (x.answer, x.retrieved, x.best) == (y.answer, y.retrieved, y.best)
        assert [b.text for b in x.branches] == [b.text for b in y.branches]
        assert [b.final for b in x.branches] == pytest.approx([b.final for b in y.branches], abs=1e-6)


@pytest.mark.gpu
def test_overlapped_graphed_decode_equals_plain_on_cuda():
    path = tiny_checkpoint(seed=32, num_key_value_heads=2, max_position_embeddings=1024)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (int(n),), generator=gen).tolist() for n in torch.randint(5, 300, (9,),
                                                                                             generator=gen)]
    params = [SamplingParams(max_tokens=int(n), temperature=0.0, seed=i, logprobs=2)
              for i, n in enumerate(torch.randint(1, 40, (9,), generator=gen))]
    outs = []
    for overlap in (False, True):
        engine = Engine.from_pretrained(path, device="cuda", dtype=torch.float16, progress=False, overlap=overlap,
                                        kv_cache_bytes=GPU_KV_CACHE_BYTES)
        assert engine.runner.graphs is not None
        outs.append(engine.generate(prompts, params))
        assert engine.cache_stats()["used"] == 0
    for x, y in zip(*outs):
        assert x.token_ids == y.token_ids
        assert max((abs(p - q) for p, q in zip(x.token_logprobs, y.token_logprobs)), default=0.0) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("branches", [1, 5])
def test_overlapped_decode_steps_do_not_wait_for_the_device(branches):
    """In steady decode the host may wait once per step (for the tokens of the step before the one it just
    launched); a hidden synchronizing copy or read would make it wait for the step in flight as well."""
    import warnings

    path = tiny_checkpoint(seed=33, max_position_embeddings=1024)
    engine = Engine.from_pretrained(path, device="cuda", dtype=torch.float16, progress=False, overlap=True,
                                    kv_cache_bytes=GPU_KV_CACHE_BYTES)
    parent = engine.add_request(list(range(3, 100)), SamplingParams(max_tokens=1, temperature=0.0), keep_cache=True)
    engine.run([parent])
    params = SamplingParams(max_tokens=60, temperature=0.7, seed=1, ignore_eos=True, reflection=True, logprobs=2)
    kids = engine.fork(parent, [[5 + i] * (i + 3) for i in range(branches)], params)
    engine.release(parent)
    for _ in range(4):
        engine.step()
    steps = 20
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= steps, [str(w.message) for w in syncs[:5]]
    outs = engine.run(kids)
    assert all(len(o.token_ids) == 60 for o in outs)
