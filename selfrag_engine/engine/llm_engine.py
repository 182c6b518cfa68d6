"""The engine: requests in, tokens out, over a paged KV cache shared by forked branches.

Data flows one way: request -> scheduler -> model step -> sampler -> output. A caller either uses
`generate` for whole prompts, or drives requests itself (`add_request`, `fork`, `step`, `release`), as the
Self-RAG algorithms do to branch K passages off one cached prompt.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable
from typing import Sequence as Seq

import torch
from tqdm.auto import tqdm

from selfrag_engine.backend import TRITON, choose_backend
from selfrag_engine.config import LlamaConfig
from selfrag_engine.engine.block_manager import BlockManager
from selfrag_engine.engine.cuda_graph import DecodeGraphs
from selfrag_engine.engine.kv_cache import allocate_kv_caches, num_blocks_for_budget
from selfrag_engine.engine.model_runner import ModelRunner
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.engine.scheduler import Chunk, Scheduler
from selfrag_engine.engine.sequence import Sequence, Status
from selfrag_engine.engine.transfer import copy_to_host, to_device
from selfrag_engine.errors import CacheCapacityError, RequestError
from selfrag_engine.layers.sampler import ReflectionGroups, SamplerOutput, sample
from selfrag_engine.tokenizer import Tokenizer
from selfrag_engine.weights.loader import load_model

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, step: int) -> int:
    """A well-mixed non-negative int64 seed for one draw (splitmix64 of the request seed and the step), so
    a sequence's draws do not depend on batching or preemption."""
    z = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" (EOS, stop string or stop token) or "length"
    stop_reason: str | int | None  # the stop string or stop token id that ended it, None for EOS
    cumulative_logprob: float
    token_logprobs: list[float]  # log-probability of each generated token (temperature 1)
    logprobs: list[dict[int, float]] | None  # per step, the top-n and the chosen token, when asked
    reflection_probs: torch.Tensor | None  # [steps, G] group-normalized reflection probabilities
    reflection_logprobs: torch.Tensor | None  # [steps, G] full-vocabulary log-probabilities
    reflection_groups: ReflectionGroups | None


class Engine:
    def __init__(self, model, tokenizer: Tokenizer, *, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_bytes: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 4096, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, use_kernels: bool | None = None, enforce_eager: bool = False,
                 cuda_graph_max_batch: int = 64, overlap: bool | None = None, seed: int = 0):
        self.model = model
        self.config: LlamaConfig = model.config
        self.tokenizer = tokenizer
        self.device = model.rope_cos.device
        self.dtype = model.model.embed_tokens.weight.dtype
        if tokenizer.vocab_size > self.config.vocab_size:
            raise RequestError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                               f"{self.config.vocab_size}")
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        if num_blocks is None:
            num_blocks = num_blocks_for_budget(self.config, block_size, self.dtype, self.device,
                                               kv_cache_bytes, gpu_memory_utilization)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.kv_caches = allocate_kv_caches(self.config, num_blocks, block_size, self.dtype, self.device)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        # The one backend decision: every layer of the model, the runner and the sampler ask it.
        self.backend = choose_backend(self.device, use_kernels)
        model.set_backend(self.backend)
        self.runner = ModelRunner(model, self.kv_caches, self.block_manager, self.device, self.backend)
        if self.backend == TRITON and not enforce_eager:
            self.runner.graphs = _capture_decode_graphs(self, min(max_num_seqs, cuda_graph_max_batch))
            weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            self.runner.cascade_min_saved_bytes = weight_bytes // 2
        self.reflection_groups = _reflection_groups(tokenizer)
        # On the CPU nothing runs asynchronously, so overlapping would only waste the steps it drops.
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self._in_flight: _Launched | None = None
        self.seqs: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(seed)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, quantization: str | None = None,
                        progress: bool = True, **engine_kwargs) -> "Engine":
        """Loads a Hugging Face Llama checkpoint directory (weights, config and tokenizer).

        dtype defaults to the checkpoint's on CUDA and float32 on the CPU; quantization None or "fp8".
        Engine options: block_size, num_blocks or kv_cache_bytes or gpu_memory_utilization, max_num_seqs,
        max_num_batched_tokens, max_model_len, enable_prefix_caching, use_kernels (default: on CUDA),
        enforce_eager (no CUDA graphs), cuda_graph_max_batch (largest decode batch replayed from a graph),
        overlap (launch each decode step before the previous one's tokens reach the host; default: on CUDA), seed.
        """
        tokenizer = Tokenizer.from_pretrained(path)
        model = load_model(path, device=device, dtype=dtype, quantization=quantization, progress=progress)
        return cls(model, tokenizer, **engine_kwargs)

    # ---- requests -------------------------------------------------------------------------------

    def _token_ids(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_bos=True)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise RequestError("empty prompt")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")
        return ids

    def _check_fits(self, num_tokens: int, max_new_tokens: int, what: str) -> None:
        if num_tokens >= self.max_model_len:
            raise RequestError(f"{what} has {num_tokens} tokens, which leaves no room to generate within the "
                               f"model's context of {self.max_model_len} tokens")
        needed = min(num_tokens + max_new_tokens, self.max_model_len)
        capacity = self.block_manager.num_blocks() * self.block_manager.block_size()
        if needed > capacity:
            raise CacheCapacityError(f"{what} of {num_tokens} tokens with max_tokens={max_new_tokens} needs "
                                     f"{needed} tokens of KV cache but the whole pool holds {capacity} "
                                     f"({self.block_manager.num_blocks()} blocks of "
                                     f"{self.block_manager.block_size()})")

    def _new_seq(self, token_ids: list[int], params: SamplingParams, keep_cache: bool) -> Sequence:
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,),
                                                                             generator=self._seed_rng))
        seq = Sequence(next(self._ids), token_ids, len(token_ids), params, seed, keep_cache)
        self.seqs[seq.seq_id] = seq
        return seq

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    keep_cache: bool = False) -> int:
        """Queues a prompt (text, encoded with BOS, or token ids); returns its request id. With keep_cache
        the finished request keeps its KV blocks so it can be forked; `release` frees them."""
        params = params or SamplingParams()
        ids = self._token_ids(prompt)
        self._check_fits(len(ids), params.max_tokens, "prompt")
        seq = self._new_seq(ids, params, keep_cache)
        self.scheduler.add(seq)
        return seq.seq_id

    def fork(self, parent: int, suffixes: Iterable[str | Seq[int]], params: SamplingParams | Seq[SamplingParams],
             prefix_len: int | None = None, keep_cache: bool = False) -> list[int]:
        """New requests that continue from the parent's first `prefix_len` tokens (default: all of them) followed
        by their own suffix, sharing the parent's cached blocks. Text suffixes are encoded without BOS.

        The parent must hold its cache (running, or finished with keep_cache). prefix_len may drop the parent's
        last sampled token (whose K/V is not computed yet), not computed tokens.
        """
        p = self._get(parent)
        self._cancel_in_flight(parent)
        if p.status not in (Status.RUNNING, Status.PAUSED):
            raise RequestError(f"request {parent} holds no KV cache to fork from (status {p.status.value})")
        prefix_len = len(p.token_ids) if prefix_len is None else prefix_len
        if not p.num_computed <= prefix_len <= len(p.token_ids):
            raise RequestError(f"prefix_len {prefix_len} must lie between the parent's computed tokens "
                               f"({p.num_computed}) and its length ({len(p.token_ids)})")
        suffix_ids = [self.tokenizer.encode(s, add_bos=False) if isinstance(s, str) else [int(t) for t in s]
                      for s in suffixes]
        if isinstance(params, SamplingParams):
            params = [params] * len(suffix_ids)
        if len(params) != len(suffix_ids):
            raise RequestError(f"{len(suffix_ids)} suffixes but {len(params)} sampling params")
        # Every branch is checked before any is made, so a bad one leaves no half-made siblings behind.
        for suffix, prm in zip(suffix_ids, params):
            n = prefix_len + len(suffix)
            if n == p.num_computed:
                raise RequestError("a forked branch needs at least one token after the parent's computed prefix")
            bad = [t for t in suffix if not 0 <= t < self.config.vocab_size]
            if bad:
                raise RequestError(f"token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")
            self._check_fits(n, prm.max_tokens, "forked branch")
        children = [self._new_seq(p.token_ids[:prefix_len] + suffix, prm, keep_cache)
                    for suffix, prm in zip(suffix_ids, params)]
        try:
            self.block_manager.fork(p.seq_id, [c.seq_id for c in children])
        except BaseException:
            for c in children:
                del self.seqs[c.seq_id]
            raise
        for c in children:
            c.num_computed = p.num_computed
            self.scheduler.add_running(c)
        return [c.seq_id for c in children]

    def release(self, seq_id: int) -> None:
        """Frees a request's KV blocks (a paused fork parent, or an unfinished request, which is aborted)."""
        seq = self._get(seq_id)
        self._cancel_in_flight(seq_id)
        self.scheduler.remove(seq)
        if self.block_manager.has(seq_id):
            self.block_manager.free(seq_id, seq.num_computed)
        if seq.status != Status.FINISHED:
            seq.finish_reason = seq.finish_reason or "abort"
        seq.status = Status.FINISHED

    def forget(self, seq_id: int) -> None:
        """Drops the record of a request (its output can no longer be read), freeing its blocks if it holds any."""
        seq = self._get(seq_id)
        if seq.status != Status.FINISHED:
            self.release(seq_id)
        del self.seqs[seq_id]

    def _get(self, seq_id: int) -> Sequence:
        if seq_id not in self.seqs:
            raise RequestError(f"unknown request id {seq_id}")
        return self.seqs[seq_id]

    def is_done(self, seq_id: int) -> bool:
        return self._get(seq_id).status in (Status.PAUSED, Status.FINISHED)

    # ---- stepping -------------------------------------------------------------------------------

    def step(self) -> list[int]:
        """Runs one model step over the scheduled batch; returns the ids of requests that finished in it.

        With `overlap`, a decode step is followed at once by the next one, scheduled and launched before the
        first one's sampled tokens reach the host (they are the next step's inputs, on the device): the host's
        share of each step (scheduling, metadata, reading the tokens, stop checks) runs while the device
        computes the following one. step() then returns with that next step in flight; it finishes in the next
        call. Every sequence gets the tokens it gets without overlap; one that stops (EOS, a stop string) has
        one more row computed and dropped."""
        cur, self._in_flight = self._in_flight, None
        if cur is None:
            batch = self.scheduler.schedule()
            if not batch.chunks:
                return []
            cur = self._launch(batch.chunks, batch.copies)
            if cur is None:
                return []
        if self.overlap:
            self._in_flight = self._launch_ahead(cur)
        finished = self._finish(cur, self._in_flight)
        if self._in_flight is not None and len(self._in_flight.dropped) == len(self._in_flight.seqs):
            self._in_flight = None
        return finished

    def _launch(self, chunks: list[Chunk], copies: list[tuple[int, int]],
                next_tokens: torch.Tensor | None = None) -> _Launched | None:
        """Queues the model step and the sampling of its rows (None if no row samples); the host copies of the
        result are queued too, not waited for."""
        logits = self.runner.run(chunks, copies, next_tokens=next_tokens)
        ahead = next_tokens is not None
        if not ahead:
            for c in chunks:
                c.seq.num_computed = c.start + c.num_tokens
            chunks = [c for c in chunks if c.samples]
            if not chunks:
                return None
        seqs = [c.seq for c in chunks]
        out = self._sample(logits, seqs, ahead)
        host, ready = copy_to_host(out)
        return _Launched(seqs, [c.start for c in chunks], host, ready, ahead, out.tokens)

    def _launch_ahead(self, cur: _Launched) -> _Launched | None:
        """The decode step after `cur`, launched before cur's tokens are on the host; None when it cannot be
        (see Scheduler.schedule_ahead), or when some sequence reaches its length limit with cur's token."""
        rows = [i for i, s in enumerate(cur.seqs) if s.seq_id not in cur.dropped]
        seqs = [cur.seqs[i] for i in rows]
        if not seqs or any(s.num_output_tokens + 1 >= s.params.max_tokens or len(s.token_ids) + 1 >= self.max_model_len
                           for s in seqs):
            return None
        batch = self.scheduler.schedule_ahead(seqs)
        if batch is None:
            return None
        tokens = cur.tokens
        if len(rows) < len(cur.seqs):
            tokens = tokens[to_device(rows, torch.long, tokens.device)]
        try:
            return self._launch(batch.chunks, batch.copies, next_tokens=tokens)
        except BaseException:
            for s in seqs:
                self.block_manager.cancel_reserved(s.seq_id)
            raise

    def _finish(self, cur: _Launched, nxt: _Launched | None) -> list[int]:
        """Appends cur's sampled tokens once they are on the host; returns the requests that finished. A
        sequence that finished drops its row of `nxt`, the step launched after cur."""
        if cur.ready is not None:
            cur.ready.synchronize()
        out = cur.host
        tokens, logprobs = out.tokens.tolist(), out.logprobs.tolist()
        in_next = set() if nxt is None else {s.seq_id for s in nxt.seqs}
        finished = []
        for i, seq in enumerate(cur.seqs):
            if seq.seq_id in cur.dropped:
                continue
            if cur.ahead:
                # The step computed the K/V of the token it was launched without; the cache learns its id now.
                self.block_manager.commit_reserved(seq.seq_id, [seq.token_ids[cur.starts[i]]])
                seq.num_computed = cur.starts[i] + 1
            if self._append_token(seq, out, i, tokens[i], logprobs[i]):
                finished.append(seq.seq_id)
                if seq.seq_id in in_next:
                    nxt.dropped.add(seq.seq_id)
                    if self.block_manager.has(seq.seq_id):  # paused: keeps its blocks, not nxt's slot
                        self.block_manager.cancel_reserved(seq.seq_id)
        return finished

    def _cancel_in_flight(self, seq_id: int) -> None:
        """If the step launched ahead computes a row of `seq_id`, drops that step, leaving every sequence as a
        plain step() leaves it, so the request can be forked or released as between plain steps. The step's
        device work is wasted; its slots were reserved in private blocks (Scheduler.schedule_ahead), so its
        late K/V writes touch no other sequence."""
        nxt = self._in_flight
        if nxt is None or seq_id in nxt.dropped or all(s.seq_id != seq_id for s in nxt.seqs):
            return
        self._in_flight = None
        for seq in nxt.seqs:
            if seq.seq_id not in nxt.dropped and self.block_manager.has(seq.seq_id):
                self.block_manager.cancel_reserved(seq.seq_id)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], ahead: bool = False):
        """ahead: the rows' previous tokens are not appended yet, so each samples the token after the next."""
        dev = logits.device
        params = [s.params for s in seqs]
        top_n = max((p.logprobs or 0) for p in params)
        want_groups = self.reflection_groups is not None and any(p.reflection for p in params)
        return sample(
            logits,
            temperature=to_device([p.temperature for p in params], torch.float32, dev),
            top_p=to_device([p.top_p for p in params], torch.float32, dev),
            top_k=to_device([p.top_k for p in params], torch.int32, dev),
            seeds=to_device([step_seed(s.seed, s.num_output_tokens + ahead) for s in seqs], torch.int64, dev),
            groups=self.reflection_groups if want_groups else None,
            top_n=top_n,
            backend=self.backend,
        )

    def _append_token(self, seq: Sequence, out: SamplerOutput, row: int, token: int, lp: float) -> bool:
        p = seq.params
        seq.token_ids.append(token)
        seq.token_logprobs.append(lp)
        seq.cumulative_logprob += lp
        if p.logprobs is not None:
            top = {int(t): float(v) for t, v in zip(out.topn_ids[row, :p.logprobs].tolist(),
                                                   out.topn_logprobs[row, :p.logprobs].tolist())}
            top[token] = lp
            seq.top_logprobs.append(top)
        if p.reflection and out.group_probs is not None:
            seq.reflection.append(out.group_probs[row])
            seq.reflection_logprobs.append(out.group_logprobs[row])

        reason = None
        if token == self.tokenizer.eos_id and not p.ignore_eos:
            reason = ("stop", None)
        elif token in p.stop_token_ids:
            reason = ("stop", token)
        elif p.stop:
            text = self._decode(seq)
            for s in p.stop:
                at = text.find(s, max(0, len(seq.text) - len(s)))
                if at >= 0:
                    seq.text = text[:at + len(s)] if p.include_stop_str_in_output else text[:at]
                    reason = ("stop", s)
                    break
            else:
                seq.text = text
        if reason is None and (seq.num_output_tokens >= p.max_tokens or len(seq.token_ids) >= self.max_model_len):
            reason = ("length", None)
        if reason is None:
            return False
        seq.finish_reason, seq.stop_reason = reason
        if p.detokenize and not (p.stop and reason[1] in p.stop):
            seq.text = self._decode(seq)
        self.scheduler.remove(seq)
        if seq.keep_cache:
            seq.status = Status.PAUSED
        else:
            self.block_manager.free(seq.seq_id)
            seq.status = Status.FINISHED
        return True

    def _decode(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=seq.params.skip_special_tokens)

    def run(self, seq_ids: Iterable[int], progress: bool = False) -> list[RequestOutput]:
        """Steps until every listed request is done; returns their outputs in order."""
        seq_ids = list(seq_ids)
        pending = {i for i in seq_ids if not self.is_done(i)}
        bar = tqdm(total=len(pending), desc="generating", unit="req", disable=not progress)
        while pending:
            if not self.scheduler.has_work():
                raise RuntimeError(f"requests {sorted(pending)} are not scheduled")
            done = pending.intersection(self.step())
            pending -= done
            bar.update(len(done))
        bar.close()
        return [self.output(i) for i in seq_ids]

    def output(self, seq_id: int) -> RequestOutput:
        seq = self._get(seq_id)
        groups = self.reflection_groups if seq.reflection else None
        return RequestOutput(
            request_id=seq.seq_id,
            prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
            token_ids=list(seq.output_token_ids),
            text=seq.text,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            cumulative_logprob=seq.cumulative_logprob,
            token_logprobs=list(seq.token_logprobs),
            logprobs=list(seq.top_logprobs) if seq.params.logprobs is not None else None,
            reflection_probs=torch.stack(seq.reflection) if seq.reflection else None,
            reflection_logprobs=torch.stack(seq.reflection_logprobs) if seq.reflection else None,
            reflection_groups=groups,
        )

    def generate(self, prompts: str | Seq[int] | Seq[str | Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Generates for each prompt (text or token ids) in one continuous batch."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        try:
            return self.run(ids, progress=progress)
        finally:
            for i in ids:
                self.forget(i)

    # ---- scoring --------------------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, token_ids: Seq[int] | str) -> torch.Tensor:
        """Logits [len, vocab] (float32) for every position of a prompt, computed through the paged cache in
        chunks of at most max_num_batched_tokens."""
        ids = self._token_ids(token_ids)
        if len(ids) > self.max_model_len:
            raise RequestError(f"{len(ids)} tokens exceed the model's context of {self.max_model_len}")
        self._check_fits(len(ids) - 1, 1, "scored sequence")
        seq = self._new_seq(ids, SamplingParams(max_tokens=1), keep_cache=False)
        if not self.block_manager.can_allocate(len(ids)):
            raise CacheCapacityError(f"the KV pool has no room for {len(ids)} tokens now")
        # Every position needs its logits, so the prefix cache must not skip any.
        self.block_manager.allocate(seq.seq_id, ids, False)
        logits = []
        try:
            step = self.scheduler.max_num_batched_tokens
            for start in range(0, len(ids), step):
                logits.append(self.runner.run([Chunk(seq, start, min(step, len(ids) - start))], [],
                                              all_logits=True))
                seq.num_computed = start + logits[-1].shape[0]
        finally:
            self.block_manager.free(seq.seq_id, seq.num_computed)
            del self.seqs[seq.seq_id]
        return torch.cat(logits)

    def cache_stats(self) -> dict[str, int]:
        bm = self.block_manager
        return {"num_blocks": bm.num_blocks(), "block_size": bm.block_size(), "free": bm.num_free_blocks(),
                "used": bm.num_used_blocks(), "shared": bm.num_shared_blocks(), "cached": bm.num_cached_blocks()}


@dataclass
class _Launched:
    """A model step whose sampled tokens may still be on their way to the host."""
    seqs: list[Sequence]  # the sampling rows, in order
    starts: list[int]  # the position each row computes
    host: SamplerOutput  # the sampler's output on the host, complete once `ready` has been waited on
    ready: torch.cuda.Event | None  # None when the output was computed on the CPU
    ahead: bool  # scheduled before its input tokens were on the host: its slots are reserved, not committed
    tokens: torch.Tensor  # the sampled tokens on the model's device: the inputs of a step launched after it
    dropped: set[int] = field(default_factory=set)  # sequences that finished before this step did


def _capture_decode_graphs(engine: Engine, max_batch: int) -> DecodeGraphs | None:
    """Captured decode graphs, or None (eager decode, with a warning) when capture fails on this setup."""
    graphs = DecodeGraphs(engine.model, engine.kv_caches, max_batch, engine.max_model_len,
                          engine.block_manager.block_size(), engine.device)
    try:
        graphs.capture()
    except RuntimeError as e:
        warnings.warn(f"CUDA graph capture of the decode step failed, decoding eagerly: {e}", RuntimeWarning)
        return None
    return graphs


def _reflection_groups(tokenizer: Tokenizer) -> ReflectionGroups | None:
    try:
        ids = tokenizer.reflection_token_ids()
    except (ValueError, KeyError):
        return None
    return ReflectionGroups.from_token_ids(ids.groups())
