"""The sampler (fused Triton kernel and torch path) against a float64 reference.

Without CUDA the Triton kernel runs in the interpreter (~20-60 ms per row), so its shapes stay small and its
distribution test draws a few hundred samples as rows of one launch. Outputs are poisoned (NaN / -1) before
the launch, so a match with the reference shows every element was written.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import triton
import triton.language as tl

from selfrag_engine.layers.sampler import MAX_TOP_N, ReflectionGroups, sample, sample_torch
from selfrag_engine.kernels.sampling import fused_sample

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ["torch", "triton"]
NEG_INF = float("-inf")


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty returns NaN-filled float / -1-filled integer tensors while the samplers run."""
    empty = torch.empty

    def poison(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", poison)
    yield
    monkeypatch.undo()


# ------------------------------------------------------------------------------------------- reference


def ref_sample(logits, temperature, top_p, top_k, groups=None, top_n=0):
    """float64 reference: greedy tokens, lse, log-probs, the kept set and the renormalized distribution of
    each row, group log-probs and group-normalized probabilities, top-n (ties to the lower id)."""
    x = logits.detach().double().cpu()
    batch, vocab = x.shape
    lse = torch.logsumexp(x, -1)
    logp = x - lse[:, None]
    keep = torch.zeros(batch, vocab, dtype=torch.bool)
    dist = torch.zeros(batch, vocab, dtype=torch.float64)
    for b in range(batch):
        t, p, k = float(temperature[b]), float(top_p[b]), int(top_k[b])
        if t <= 0:
            continue
        row = x[b]
        vals, order = torch.sort(row, descending=True, stable=True)
        w = torch.exp((vals - vals[0]) / t)
        thr = NEG_INF
        if 0 < k < vocab:
            thr = float(vals[k - 1])
            w = torch.where(vals >= thr, w, 0.0)
        if p < 1.0:
            cum = torch.cumsum(w, 0)
            first = int((cum < p * cum[-1]).sum().clamp(max=vocab - 1))
            thr = max(thr, float(vals[first]))
        keep[b] = (row >= thr) & (row > NEG_INF)
        q = torch.where(keep[b], torch.exp((row - vals[0]) / t), 0.0)
        dist[b] = q / q.sum()
    out = dict(greedy=x.argmax(-1), lse=lse, logp=logp, keep=keep, dist=dist)
    if groups is not None:
        ids = torch.tensor(groups.flat_ids)
        out["group_logprobs"] = logp[:, ids]
        gp = torch.zeros(batch, len(ids), dtype=torch.float64)
        for name in groups.names:
            s = groups.span(name)
            seg = x[:, ids[s]]
            gmax = seg.max(-1, keepdim=True).values
            e = torch.exp(seg - torch.where(gmax > NEG_INF, gmax, 0.0))
            den = e.sum(-1, keepdim=True)
            gp[:, s] = torch.where(den > 0, e / torch.where(den > 0, den, 1.0), 0.0)
        out["group_probs"] = gp
    if top_n:
        vals, ids = torch.sort(x, dim=-1, descending=True, stable=True)
        out["topn_ids"], out["topn_logprobs"] = ids[:, :top_n], vals[:, :top_n] - lse[:, None]
    return out


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper quantile of chi-square(df) by the Wilson-Hilferty approximation; z = 3.719 is the one-sided
    normal quantile of 1e-4, so a correct sampler fails a fixed-seed test with probability ~1e-4."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def chi2_stat(tokens: torch.Tensor, dist: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic of the drawn tokens against `dist` [V]; bins expecting < 5 draws are pooled."""
    n = tokens.numel()
    counts = torch.bincount(tokens.cpu(), minlength=dist.numel()).double()
    expected = dist.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] < 5:  # pool the remainder into the smallest kept bin rather than test a tiny bin
        obs, exp = obs[:-1].clone(), exp[:-1].clone()
        j = int(exp.argmin())
        obs[j] += counts[~big].sum()
        exp[j] += expected[~big].sum()
    stat = float(((obs - exp) ** 2 / exp).sum())
    return stat, exp.numel() - 1


# ------------------------------------------------------------------------------------------- inputs

GROUPS = ReflectionGroups.from_token_ids({
    "retrieval": [3, 4, 5], "relevance": [6, 7], "grounding": [8, 9, 10], "utility": [11, 12, 13, 14, 15],
})


def make_logits(batch: int, vocab: int, dtype: torch.dtype, seed: int, strided: bool = False) -> torch.Tensor:
    """Random rows plus the hard cases: exact ties at the max, -inf entries (some on group tokens), a row
    with one finite entry, a row of values on a coarse grid (ties everywhere), a row with the whole
    grounding group at -inf."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=gen, dtype=torch.float64) * 2.5
    x[0, [17, 40, vocab - 1]] = x[0].max() + 1.0                  # three-way tie at the max
    x[0, 3] = x[0, 4] = x[0, 5] = 0.75                              # a tied group
    if batch > 1:
        x[1, torch.rand(vocab, generator=gen) < 0.3] = NEG_INF
        x[1, [6, 9]] = NEG_INF
    if batch > 2:
        x[2] = NEG_INF
        x[2, vocab // 2] = 0.5                                      # one finite entry
    if batch > 3:
        x[3] = torch.round(x[3] * 4) / 4                            # coarse grid
    if batch > 4:
        x[4, 8:11] = NEG_INF                                        # a whole group at -inf
    x = x.to(dtype)
    if strided:
        wide = torch.full((batch, vocab + 37), 7.0, dtype=dtype)
        wide[:, 5:5 + vocab] = x
        x = wide[:, 5:5 + vocab]
    return x.to(DEVICE)


# (temperature, top_p, top_k) per row, cycled: greedy, plain, top-p 0.1 / 0.9, top-k 1 / 20, both, huge and
# tiny temperatures, disabled top-k (>= vocab).
ROW_PARAMS = [(0.0, 1.0, 0), (1.0, 1.0, 0), (0.7, 0.1, 0), (1.3, 0.9, 0), (1.0, 1.0, 1), (0.8, 1.0, 20),
              (1.0, 0.8, 20), (1e4, 0.5, 0), (1e-4, 1.0, 0), (0.9, 0.95, 1 << 20)]


def row_params(batch: int, offset: int = 0):
    rows = [ROW_PARAMS[(b + offset) % len(ROW_PARAMS)] for b in range(batch)]
    t = torch.tensor([r[0] for r in rows], dtype=torch.float32, device=DEVICE)
    p = torch.tensor([r[1] for r in rows], dtype=torch.float32, device=DEVICE)
    k = torch.tensor([min(r[2], 2**31 - 1) for r in rows], dtype=torch.int32, device=DEVICE)
    return t, p, k


def seeds_for(batch: int, base: int = 0) -> torch.Tensor:
    return (torch.arange(batch, dtype=torch.int64) * 7919 + 12345 + base).to(DEVICE)


def run(backend, logits, t, p, k, seeds, groups=None, top_n=0):
    return sample(logits, t, p, k, seeds, groups=groups, top_n=top_n, backend=backend)


def check_against_ref(out, ref, t, groups, top_n, lp_tol=1e-5):
    batch = t.numel()
    tokens = out.tokens.cpu()
    assert out.tokens.dtype == torch.int64 and out.tokens.shape == (batch,)
    assert ((tokens >= 0) & (tokens < ref["logp"].shape[1])).all()
    greedy = t.cpu() == 0
    assert torch.equal(tokens[greedy], ref["greedy"][greedy])
    sampled = ~greedy
    assert ref["keep"][sampled.nonzero().flatten(), tokens[sampled]].all(), "a token outside the kept set"
    torch.testing.assert_close(out.lse.cpu().double(), ref["lse"], atol=lp_tol, rtol=0)
    torch.testing.assert_close(out.logprobs.cpu().double(), ref["logp"].gather(1, tokens[:, None])[:, 0],
                               atol=lp_tol, rtol=0)
    if groups is not None:
        torch.testing.assert_close(out.group_logprobs.cpu().double(), ref["group_logprobs"], atol=lp_tol, rtol=0)
        torch.testing.assert_close(out.group_probs.cpu().double(), ref["group_probs"], atol=1e-6, rtol=0)
    else:
        assert out.group_logprobs is None and out.group_probs is None
    if top_n:
        assert torch.equal(out.topn_ids.cpu(), ref["topn_ids"])
        torch.testing.assert_close(out.topn_logprobs.cpu().double(), ref["topn_logprobs"], atol=lp_tol, rtol=0)
    else:
        assert out.topn_ids is None and out.topn_logprobs is None


# ------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,strided,top_n", [(torch.float32, False, 5), (torch.float16, True, 20),
                                                 (torch.float32, True, 0)])
def test_matches_float64_reference(backend, dtype, strided, top_n, poisoned):
    batch, vocab = 10, 1500
    logits = make_logits(batch, vocab, dtype, seed=1, strided=strided)
    t, p, k = row_params(batch)
    groups = GROUPS if top_n != 0 else None
    out = run(backend, logits, t, p, k, seeds_for(batch), groups, top_n)
    check_against_ref(out, ref_sample(logits, t, p, k, groups, top_n), t, groups, top_n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,top_n", [(torch.float32, MAX_TOP_N + 1), (torch.float16, 700), (torch.float32, 1500)])
def test_top_n_beyond_the_fused_pass(backend, dtype, top_n, poisoned):
    """Past MAX_TOP_N the top-n comes from a device top-k: the exact top n of the float64 reference, ties (the
    coarse-grid row, -inf entries, up to the whole vocabulary) to the lower id, and the same tokens and
    scores as without it."""
    batch, vocab = 6, 1500
    logits = make_logits(batch, vocab, dtype, seed=11)
    t, p, k = row_params(batch)
    out = run(backend, logits, t, p, k, seeds_for(batch), GROUPS, top_n)
    check_against_ref(out, ref_sample(logits, t, p, k, GROUPS, top_n), t, GROUPS, top_n)
    plain = run(backend, logits, t, p, k, seeds_for(batch), GROUPS, 0)
    assert torch.equal(out.tokens, plain.tokens) and torch.equal(out.group_probs, plain.group_probs)


def test_top_n_device_top_k_breaks_ties_to_the_lower_id():
    """A row whose n-th value is shared by more tokens than fit: the lowest ids among them are kept."""
    from selfrag_engine.layers.sampler import top_n_logprobs

    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 4, (5, 300), generator=gen).double()  # four values, about 75 tokens each
    lse = torch.logsumexp(x, -1)
    for n in (1, 74, 75, 76, 150, 299, 300):
        ids, lps = top_n_logprobs(x.float().to(DEVICE), lse.float().to(DEVICE), n)
        key = [sorted(range(300), key=lambda j: (-float(x[r, j]), j))[:n] for r in range(5)]
        assert ids.cpu().tolist() == key
        torch.testing.assert_close(lps.cpu().double(), x.gather(1, torch.tensor(key)) - lse[:, None],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_tile_rows(backend):
    """Vocab spanning many tiles of both kernel passes, with every truncation and the top-n."""
    batch, vocab = 6, 3001
    logits = make_logits(batch, vocab, torch.float32, seed=2)
    t, p, k = row_params(batch, offset=1)
    if backend == "triton":
        out = fused_sample(logits, t, p, k, seeds_for(batch), (GROUPS.token_ids(DEVICE), GROUPS.offsets(DEVICE)),
                           top_n=7, block_v=256, block_s=64)
    else:
        out = run(backend, logits, t, p, k, seeds_for(batch), GROUPS, 7)
    check_against_ref(out, ref_sample(logits, t, p, k, GROUPS, 7), t, GROUPS, 7)


def test_llama_vocab_rows():
    """The Self-RAG vocabulary (32,016) at batch 2 through the kernel: greedy and top-p with the groups."""
    vocab = 32016
    logits = make_logits(2, vocab, torch.float16, seed=3)
    logits[:, 32000:] += 4.0  # reflection tokens in the head of the distribution
    groups = ReflectionGroups.from_token_ids({"retrieval": [32000, 32001, 32002], "relevance": [32003, 32004],
                                              "grounding": [32012, 32013, 32014],
                                              "utility": [32007, 32008, 32009, 32010, 32011]})
    t = torch.tensor([0.0, 0.8], device=DEVICE)
    p = torch.tensor([1.0, 0.9], device=DEVICE)
    k = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    out = sample(logits, t, p, k, seeds_for(2), groups=groups, top_n=3, backend="triton")
    check_against_ref(out, ref_sample(logits, t, p, k, groups, 3), t, groups, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_extremes_and_top_k_1(backend):
    """Tiny temperature and top_k=1 give the argmax on rows with a unique max; a huge temperature with top_k
    keeps sampling over the whole kept set."""
    batch, vocab = 8, 256
    gen = torch.Generator().manual_seed(4)
    # Distinct values at least 0.01 apart, so 1e-4 puts the runner-up e^-100 below the max.
    logits = (torch.randperm(vocab, generator=gen).double() * 0.01).float().repeat(batch, 1).to(DEVICE)
    greedy = logits[0].argmax()
    ones = torch.ones(batch, device=DEVICE)
    for t, k in ((1e-4, 0), (1.0, 1), (1e4, 1)):
        out = run(backend, logits, ones * t, ones, torch.full((batch,), k, dtype=torch.int32, device=DEVICE),
                  seeds_for(batch))
        assert (out.tokens == greedy).all(), (t, k)
    out = run(backend, logits, ones * 1e4, ones, torch.full((batch,), 4, dtype=torch.int32, device=DEVICE),
              seeds_for(batch))
    top4 = set(torch.topk(logits[0], 4).indices.tolist())
    assert set(out.tokens.tolist()) <= top4 and len(set(out.tokens.tolist())) >= 2


# ------------------------------------------------------------------------------------------- randomness


def _flat_head(vocab: int, seed: int) -> torch.Tensor:
    """Logits whose top-p sets hold several tokens of comparable probability."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(vocab, generator=gen) * 0.8 - 4.0
    x[:6] = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.0, -0.4])
    return x[torch.randperm(vocab, generator=gen)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_draws_stay_in_kept_set_and_are_deterministic(backend):
    batch, vocab = 48, 200
    row = _flat_head(vocab, seed=5)
    logits = row.repeat(batch, 1).to(DEVICE)
    t, p, k = row_params(batch)
    ref = ref_sample(logits, t, p, k)
    seeds = seeds_for(batch, base=99)
    a = run(backend, logits, t, p, k, seeds)
    assert ref["keep"][torch.arange(batch)[t.cpu() > 0], a.tokens.cpu()[t.cpu() > 0]].all()
    b = run(backend, logits, t, p, k, seeds)
    assert torch.equal(a.tokens, b.tokens)
    # One seed is one draw: a row's token depends on its seed, not on its position in the batch.
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    c = run(backend, logits, t[perm], p[perm], k[perm], seeds[perm])
    assert torch.equal(c.tokens, a.tokens[perm])
    # Different seeds, different draws: at T=1 without truncation the head has several likely tokens.
    ones = torch.ones(batch, device=DEVICE)
    d = run(backend, logits, ones, ones, torch.zeros(batch, dtype=torch.int32, device=DEVICE), seeds)
    assert len(set(d.tokens.tolist())) >= 4


@triton.jit
def _row_uniform_kernel(seed_ptr, out_ptr):
    r = tl.program_id(0)
    tl.store(out_ptr + r, tl.rand(tl.load(seed_ptr + r), tl.full([], 0, dtype=tl.int32)))


def row_uniforms(backend: str, seeds: torch.Tensor) -> torch.Tensor:
    """The uniform each backend draws a row's token from (documented in the kernel and in sample_torch)."""
    if backend == "triton":
        out = torch.empty(seeds.numel(), device=seeds.device)
        _row_uniform_kernel[(seeds.numel(),)](seeds, out)
        return out.cpu().double()
    return torch.tensor([float(torch.rand((), generator=torch.Generator().manual_seed(s))) for s in seeds.tolist()],
                        dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_draw_is_inverse_cdf_of_the_kept_distribution(backend):
    """Each sampled token is the inverse CDF, in token-id order, of the float64 reference's kept and
    renormalized distribution at the row's uniform: this pins down the kept set and its weights exactly
    (ties at the threshold, -inf entries, top-k then top-p), not just membership."""
    batch, vocab = 20, 700
    logits = make_logits(batch, vocab, torch.float32, seed=8)
    t, p, k = row_params(batch, offset=3)
    seeds = seeds_for(batch, base=5)
    out = run(backend, logits, t, p, k, seeds)
    ref = ref_sample(logits, t, p, k)
    u = row_uniforms(backend, seeds)
    for b in range(batch):
        if t[b] > 0:
            expected = int((torch.cumsum(ref["dist"][b], 0) <= u[b]).sum().clamp(max=vocab - 1))
            assert int(out.tokens[b]) == expected, (b, ROW_PARAMS[(b + 3) % len(ROW_PARAMS)])


@pytest.mark.parametrize("backend,draws", [("torch", 20000), ("triton", 240)])
def test_top_p_distribution_chi_square(backend, draws):
    """Empirical frequencies of top-p (and top-k + top-p) draws against the renormalized truncated
    distribution; the Triton draws are rows of one launch (same logits, different seeds)."""
    vocab = 64
    logits = _flat_head(vocab, seed=6).repeat(draws, 1).to(DEVICE)
    for temp, top_p, top_k in ((0.8, 0.8, 0), (1.2, 0.9, 4)):
        t = torch.full((draws,), temp, device=DEVICE)
        p = torch.full((draws,), top_p, device=DEVICE)
        k = torch.full((draws,), top_k, dtype=torch.int32, device=DEVICE)
        ref = ref_sample(logits[:1], t[:1], p[:1], k[:1])
        kept = int(ref["keep"][0].sum())
        assert 3 <= kept <= 6  # the case is what it claims: a truncated head of several tokens
        out = run(backend, logits, t, p, k, seeds_for(draws, base=2024))
        tokens = out.tokens.cpu()
        assert ref["keep"][0, tokens].all()
        stat, df = chi2_stat(tokens, ref["dist"][0])
        assert stat < chi2_critical(df), (temp, top_p, top_k, stat, df)


def test_chi_square_check_rejects_a_wrong_distribution():
    """The test above has power: draws from the untruncated distribution fail it."""
    vocab, draws = 64, 240
    logits = _flat_head(vocab, seed=6).repeat(draws, 1)
    ones = torch.ones(draws)
    t, p, k = ones * 0.8, ones * 0.8, torch.zeros(draws, dtype=torch.int32)
    wrong = sample_torch(logits, t, ones, k, seeds_for(draws, base=2024).cpu()).tokens
    ref = ref_sample(logits[:1], t[:1], p[:1], k[:1])
    stat, df = chi2_stat(wrong, ref["dist"][0])
    assert stat > chi2_critical(df)


# ------------------------------------------------------------------------------------------- API


def test_reflection_groups():
    g = ReflectionGroups.from_token_ids({"a": [5, 6], "b": [1, 2, 3]})
    assert g.names == ("a", "b") and g.flat_ids == (5, 6, 1, 2, 3) and g.num_tokens == 5
    assert g.span("b") == slice(2, 5)
    assert g.token_ids().tolist() == [5, 6, 1, 2, 3] and g.offsets().tolist() == [0, 2, 5]
    assert g.token_ids("cpu") is g.token_ids(torch.device("cpu"))  # cached per device
    assert g.token_ids().dtype == torch.int32 and g.offsets().dtype == torch.int32
    assert g == ReflectionGroups.from_token_ids({"a": [5, 6], "b": [1, 2, 3]}) and hash(g)
    with pytest.raises(KeyError):
        g.span("c")
    for bad in ({"a": []}, {"a": [-1]}, {}):
        with pytest.raises(ValueError):
            ReflectionGroups.from_token_ids(bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    b, v = 2, 50
    x = torch.randn(b, v, device=DEVICE)
    t, p = torch.ones(b, device=DEVICE), torch.ones(b, device=DEVICE)
    k, s = torch.zeros(b, dtype=torch.int32, device=DEVICE), torch.zeros(b, dtype=torch.int64, device=DEVICE)
    good = dict(logits=x, temperature=t, top_p=p, top_k=k, seeds=s)
    cases = [
        (dict(logits=x[0]), "batch, vocab"),
        (dict(logits=x.long()), "float16"),
        (dict(logits=x[:, :0]), "empty"),
        (dict(temperature=torch.ones(b + 1, device=DEVICE)), "temperature"),
        (dict(temperature=torch.ones(b, dtype=torch.float64, device=DEVICE)), "temperature"),
        (dict(top_p=[1.0, 1.0]), "top_p"),
        (dict(top_k=k.long()), "top_k"),
        (dict(seeds=s.int()), "seeds"),
    ]
    if CUDA:
        cases.append((dict(seeds=s.cpu()), "seeds"))
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            sample(**{**good, **change}, backend=backend)
    for top_n in (-1, 2.0, True):
        with pytest.raises(ValueError, match="top_n"):
            sample(**good, top_n=top_n, backend=backend)
    with pytest.raises(ValueError, match="top_n"):
        sample(x[:, :10], t, p, k, s, top_n=11, backend=backend)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(**good, groups=ReflectionGroups.from_token_ids({"a": [1, v]}), backend=backend)
    with pytest.raises(ValueError, match="backend"):
        sample(**good, backend="numpy")


def test_kernel_wrapper_checks_group_tables():
    x = torch.randn(2, 50, device=DEVICE)
    args = (x, torch.ones(2, device=DEVICE), torch.ones(2, device=DEVICE), torch.zeros(2, dtype=torch.int32,
            device=DEVICE), torch.zeros(2, dtype=torch.int64, device=DEVICE))
    i32 = dict(dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="int32"):
        fused_sample(*args, (torch.tensor([1, 2], device=DEVICE), torch.tensor([0, 2], **i32)))
    with pytest.raises(ValueError, match="pair"):
        fused_sample(*args, torch.tensor([1, 2], **i32))
    with pytest.raises(ValueError, match="block_s"):
        fused_sample(*args, block_s=100)
    if not CUDA:  # table values are checked where that costs no device sync
        with pytest.raises(ValueError, match="rise strictly"):
            fused_sample(*args, (torch.tensor([1, 2], **i32), torch.tensor([0, 0, 2], **i32)))
        with pytest.raises(ValueError, match="lie in"):
            fused_sample(*args, (torch.tensor([1, 50], **i32), torch.tensor([0, 2], **i32)))


FLT_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_finite_logits_have_defined_results(backend, dtype, poisoned):
    """NaN counts as -inf, +inf as the largest finite float32, and a row with no finite logit has token 0,
    top-n ids 0..n-1, lse -inf and NaN log-probabilities: never a -1 id, on either backend."""
    vocab, top_n = 64, 4
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(7, vocab, generator=gen, dtype=torch.float64) * 2.0
    x[0, torch.rand(vocab, generator=gen) < 0.3] = float("nan")
    x[0, int(x[0].nan_to_num(nan=-1e9).argmax())] = float("nan")  # the largest logit is NaN: never drawn
    x[1] = x[0]
    x[2, 7] = float("inf")                                           # one +inf: every draw is that token
    x[3, [9, 3]] = float("inf")                                      # two: the mass splits between them
    x[4, [9, 3]] = float("inf")
    x[5] = float("nan")                                              # no finite logit
    x[6] = NEG_INF
    logits = x.to(dtype).to(DEVICE)
    t = torch.tensor([0.0, 0.9, 0.7, 0.0, 1.0, 1.0, 0.0], device=DEVICE)
    p = torch.tensor([1.0, 0.9, 0.95, 1.0, 1.0, 0.9, 1.0], device=DEVICE)
    k = torch.tensor([0, 5, 0, 0, 0, 3, 0], dtype=torch.int32, device=DEVICE)
    out = run(backend, logits, t, p, k, seeds_for(7), GROUPS, top_n)

    tokens, ids = out.tokens.cpu(), out.topn_ids.cpu()
    assert ((tokens >= 0) & (tokens < vocab)).all() and ((ids >= 0) & (ids < vocab)).all()
    # Rows 0-4: the float64 reference of the logits read as the sampler defines them.
    finite = x.to(dtype).double().nan_to_num(nan=NEG_INF, posinf=FLT_MAX)[:5]
    ref = ref_sample(finite, t[:5], p[:5], k[:5], GROUPS, top_n)
    check_against_ref(type(out)(*(f[:5] for f in (out.tokens, out.logprobs, out.lse, out.group_logprobs,
                                                   out.group_probs, out.topn_ids, out.topn_logprobs))),
                      ref, t[:5], GROUPS, top_n, lp_tol=1e-4)
    assert not torch.isnan(x[0, tokens[0]]) and not torch.isnan(x[1, tokens[1]])
    assert tokens[2] == 7 and tokens[3] == 3 and int(tokens[4]) in (3, 9)
    assert torch.isfinite(out.lse[:5]).all()
    # Rows 5-6: no distribution.
    assert tokens[5:].tolist() == [0, 0]
    assert ids[5:].tolist() == [[0, 1, 2, 3]] * 2
    assert out.lse[5:].cpu().tolist() == [NEG_INF, NEG_INF]
    for lp in (out.logprobs[5:], out.topn_logprobs[5:], out.group_logprobs[5:]):
        assert torch.isnan(lp).all()
    assert (out.group_probs[5:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    e = torch.empty(0, device=DEVICE)
    out = sample(torch.empty(0, 40, device=DEVICE), e, e, e.int(), e.long(), groups=GROUPS, top_n=3, backend=backend)
    assert out.tokens.shape == (0,) and out.group_probs.shape == (0, GROUPS.num_tokens) and out.topn_ids.shape == (0, 3)


def test_default_backend_follows_device():
    x = torch.randn(3, 40)
    args = (x, torch.zeros(3), torch.ones(3), torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int64))
    out = sample(*args, groups=GROUPS, top_n=2)
    assert torch.equal(out.tokens, x.argmax(-1)) and out.group_probs.shape == (3, GROUPS.num_tokens)


def test_bench_smoke(tmp_path):
    from bench.sampler import main

    path = main(["--smoke", "--out", str(tmp_path)])
    doc = json.loads(path.read_text())
    metrics = {r["metric"]: r["value"] for r in doc["results"]}
    assert "sampler_speedup_b8" in metrics or any(m.startswith("sampler_speedup_b") for m in metrics)
    for name, value in metrics.items():
        assert math.isfinite(value) and value > 0, name
    assert list(tmp_path.glob("sampler-*.png")) and list(tmp_path.glob("sampler-*.md"))


# ------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_compiled_matches_reference(dtype):
    batch, vocab = 64, 32016
    logits = make_logits(batch, vocab, dtype, seed=7, strided=dtype == torch.float16)
    t, p, k = row_params(batch)
    out = sample(logits, t, p, k, seeds_for(batch), groups=GROUPS, top_n=MAX_TOP_N)
    check_against_ref(out, ref_sample(logits, t, p, k, GROUPS, MAX_TOP_N), t, GROUPS, MAX_TOP_N)
    torch_out = sample(logits, t, p, k, seeds_for(batch), groups=GROUPS, top_n=MAX_TOP_N, backend="torch")
    greedy = t == 0
    assert torch.equal(out.tokens[greedy], torch_out.tokens[greedy])


@pytest.mark.gpu
def test_gpu_distribution_many_draws():
    draws, vocab = 40000, 64
    logits = _flat_head(vocab, seed=6).repeat(draws, 1).to(DEVICE)
    t = torch.full((draws,), 0.8, device=DEVICE)
    p = torch.full((draws,), 0.95, device=DEVICE)
    k = torch.zeros(draws, dtype=torch.int32, device=DEVICE)
    out = sample(logits, t, p, k, seeds_for(draws, base=7))
    ref = ref_sample(logits[:1], t[:1], p[:1], k[:1])
    assert ref["keep"][0, out.tokens.cpu()].all()
    stat, df = chi2_stat(out.tokens, ref["dist"][0])
    assert stat < chi2_critical(df)
