"""Decode steps replayed from CUDA graphs give the same tokens as eager steps."""
import pytest
import torch

from selfrag_engine import Engine, SamplingParams
from selfrag_engine.engine.cuda_graph import batch_size_ladder
from tests.helpers import GPU_KV_CACHE_BYTES, tiny_checkpoint


def test_batch_size_ladder():
    assert batch_size_ladder(1) == [1]
    assert batch_size_ladder(6) == [1, 2, 4, 6]
    assert batch_size_ladder(16) == [1, 2, 4, 8, 16]
    assert batch_size_ladder(40) == [1, 2, 4, 8, 16, 32, 40]
    with pytest.raises(ValueError):
        batch_size_ladder(0)


def test_cpu_engine_has_no_graphs():
    engine = Engine.from_pretrained(tiny_checkpoint(seed=1), progress=False)
    assert engine.runner.graphs is None


@pytest.mark.parametrize("error", [ValueError("head_dim must be a power of two"), AssertionError("layout"),
                                   RuntimeError("CUDA error: operation not permitted when stream is capturing")])
def test_failed_capture_of_any_kind_decodes_eagerly(error, monkeypatch):
    """Whatever capture raises (a kernel's ValueError, a compile error, CUDA's RuntimeError), the engine keeps
    running eagerly with a warning that names the error; the decision is driven here on the CPU by a fake
    capture, since a real one needs CUDA."""
    from selfrag_engine.engine import cuda_graph
    engine = Engine.from_pretrained(tiny_checkpoint(seed=1), progress=False)

    def failing_capture(self):
        self.graphs[1] = object()  # part of the ladder captured before the failure
        raise error

    monkeypatch.setattr(cuda_graph.DecodeGraphs, "capture", failing_capture)
    with pytest.warns(RuntimeWarning, match=f"decoding eagerly: {type(error).__name__}"):
        engine.runner.capture_graphs(4, engine.max_model_len)
    assert engine.runner.graphs is None
    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert len(out[0].token_ids) == 3


def test_interrupt_during_capture_is_not_swallowed(monkeypatch):
    from selfrag_engine.engine import cuda_graph
    engine = Engine.from_pretrained(tiny_checkpoint(seed=1), progress=False)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(cuda_graph.DecodeGraphs, "capture", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.runner.capture_graphs(4, engine.max_model_len)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graphed_decode_equals_eager(dtype):
    path = tiny_checkpoint(seed=11, num_key_value_heads=2, max_position_embeddings=1024)
    kw = dict(device="cuda", dtype=dtype, progress=False, max_num_seqs=20, kv_cache_bytes=GPU_KV_CACHE_BYTES)
    graphed = Engine.from_pretrained(path, **kw)
    eager = Engine.from_pretrained(path, enforce_eager=True, **kw)
    assert graphed.runner.graphs is not None and eager.runner.graphs is None
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 3, 5, 17):
        prompts = [torch.randint(3, 300, (int(n),), generator=gen).tolist()
                   for n in torch.randint(5, 300, (batch,), generator=gen)]
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        a = graphed.generate(prompts, params)
        b = eager.generate(prompts, params)
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            assert max(abs(p - q) for p, q in zip(x.token_logprobs, y.token_logprobs)) < 1e-2


@pytest.mark.gpu
def test_graphed_forked_branches_equal_eager():
    path = tiny_checkpoint(seed=12, max_position_embeddings=1024)
    outs = []
    for eager in (False, True):
        engine = Engine.from_pretrained(path, device="cuda", dtype=torch.float16, progress=False,
                                        kv_cache_bytes=GPU_KV_CACHE_BYTES,
                                        enforce_eager=eager)
        parent = engine.add_request(list(range(3, 200)), SamplingParams(max_tokens=1, temperature=0.0),
                                    keep_cache=True)
        engine.run([parent])
        kids = engine.fork(parent, [[5 + i] * (i + 1) for i in range(5)],
                           SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
        outs.append([o.token_ids for o in engine.run(kids)])
    assert outs[0] == outs[1]


class _EagerReplay:
    """Stands in for a captured graph on the CPU: a replay runs the captured function on the static buffers."""

    def __init__(self, graphs, size):
        self.graphs, self.size = graphs, size

    def replay(self):
        self.graphs.logits[self.size].copy_(self.graphs._forward(self.size))


def test_static_buffers_and_padding_rows_match_eager_decode():
    """The replay path (inputs copied into static buffers, batch padded up the ladder with rows that write and
    read nothing) gives the eager decode's tokens, with the kernels run by the interpreter."""
    import os

    from selfrag_engine.engine.cuda_graph import DecodeGraphs
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels in the Triton interpreter")
    path = tiny_checkpoint(seed=13, num_key_value_heads=2)
    outs = []
    for replayed in (False, True):
        engine = Engine.from_pretrained(path, progress=False, use_kernels=True, max_num_seqs=6)
        calls = []
        if replayed:
            graphs = DecodeGraphs(engine.model, engine.kv_caches, 6, engine.max_model_len,
                                  engine.block_size, engine.device)
            for size in graphs.sizes:
                graphs.logits[size] = torch.full((size, engine.config.vocab_size), float("nan"))
                graphs.graphs[size] = _EagerReplay(graphs, size)
            run = graphs.run
            graphs.run = lambda *a: calls.append(a[0].shape[0]) or run(*a)
            engine.runner.graphs = graphs
        gen = torch.Generator().manual_seed(3)
        prompts = [torch.randint(3, 300, (int(n),), generator=gen).tolist()
                   for n in torch.randint(3, 40, (5,), generator=gen)]
        outs.append(engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)))
        if replayed:
            assert calls and set(calls) <= {5, 4, 3, 2, 1} and 5 in calls  # 5 rows padded to the size-6 graph
    for x, y in zip(*outs):
        assert x.token_ids == y.token_ids
        assert max(abs(p - q) for p, q in zip(x.token_logprobs, y.token_logprobs)) < 1e-4
