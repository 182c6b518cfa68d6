"""The engine: requests in, tokens out, over a paged KV cache shared by forked branches.

Data flows one way: request -> scheduler -> model step -> sampler -> output. A caller either uses
`generate` for whole prompts, or drives requests itself (`add_request`, `fork`, `step`, `release`), as the
Self-RAG algorithms do to branch K passages off one cached prompt. The parts: engine/requests.py (checks and
the request table), scheduler.py (batches; the only owner of the block manager), model_runner.py (a model
step), stepping.py (launching, overlapping and finishing steps), sampling_inputs.py, output.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable
from typing import Sequence as Seq

import torch
from tqdm.auto import tqdm

from selfrag_engine.backend import TRITON, choose_backend, device_of
from selfrag_engine.config import LlamaConfig
from selfrag_engine.engine.block_manager import BlockManager
from selfrag_engine.engine.kv_cache import allocate_kv_caches, kv_bytes_per_token, num_blocks_for_budget
from selfrag_engine.engine.model_runner import ModelRunner
from selfrag_engine.engine.output import CompletionOutput, Delta, RequestOutput, request_output, take_delta
from selfrag_engine.engine.requests import Requests, batch_of
from selfrag_engine.engine.sampling_inputs import reflection_groups
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.engine.scheduler import Scheduler
from selfrag_engine.engine.sequence import Status
from selfrag_engine.engine.runtime_plan import plan_runtime
from selfrag_engine.engine.sample_groups import SampleGroup, group_output, prompt_params, relabel, sample_params
from selfrag_engine.engine.stepping import Stepper
from selfrag_engine.errors import EngineConfigError, RequestError, SchedulingError
from selfrag_engine.hub import resolve_model
from selfrag_engine.layers.attention import FP8_KV_DTYPE
from selfrag_engine.models.kv_scales import fp8_kv_scales
from selfrag_engine.tokenizer import Tokenizer
from selfrag_engine.weights.checkpoint import check_checkpoint_dir
from selfrag_engine.weights.loader import load_model

__all__ = ["CompletionOutput", "Delta", "Engine", "RequestOutput"]


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def _kv_cache_dtype(value: object, model_dtype: torch.dtype) -> torch.dtype:
    """"auto": the model's dtype; "fp8" (or "fp8_e4m3", as vLLM names it): float8 e4m3 with static scales."""
    if value not in KV_CACHE_DTYPES:
        raise EngineConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {value!r}"
                                + (" (only the e4m3 format is supported)" if value == "fp8_e5m2" else ""))
    return model_dtype if value == "auto" else FP8_KV_DTYPE


def _positive(**options: object) -> None:
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EngineConfigError(f"{name} must be a positive integer, got {value!r}")


class Engine:
    """A request's life, by request id (an int, `RequestOutput.request_id`):

    - `add_request(prompt, params, keep_cache)` queues it and returns its id; `fork(request_id, suffixes,
      params, prefix_len, keep_cache)` makes new requests that continue a request's cached prefix.
    - `step()` runs one model step over every queued request and returns the ids that finished in it;
      `step_deltas()` runs one and returns what it added to each request it touched (a `Delta`: new tokens,
      the text they made final, the finish), what a stream is made of;
      `run(request_ids)` steps until the listed ones are done and returns their outputs;
      `run_until_any(request_ids)` steps until at least one of them is done.
    - `is_done(request_id)`: finished, or paused (finished with keep_cache, its KV blocks kept to fork from).
      `output(request_id)` reads what it produced so far.
    - `release(request_id)` frees its KV blocks (aborting it if unfinished; its output stays readable);
      `forget(request_id)` also drops its record. `generate` and `score` do the whole life in one call.

    An Engine has one owner: it is not thread-safe, and nothing in it waits or locks. To share one engine
    between threads or coroutines, hand it to an `EngineLoop` (engine/loop.py), whose thread then is the only
    one that steps it; requests and programs reach it through the loop's thread-safe handles.

    Request ids are picked by the engine (`add_request` returns one) or by the caller (`request_id=`,
    `request_ids=`, with ids from `next_request_id()`), so that a caller on another thread can name a request
    before the engine has taken it.
    """

    def __init__(self, model, tokenizer: Tokenizer, *, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_bytes: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 4096, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, use_kernels: bool | None = None, enforce_eager: bool = False,
                 cuda_graph_max_batch: int = 64, overlap: bool | None = None, num_draft_tokens: int | None = None,
                 kv_cache_dtype: str = "auto", seed: int = 0):
        _positive(block_size=block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        # The one backend decision, and what follows from it and the device: every layer of the model, the
        # runner and the sampler ask the backend; graphs, overlap and speculation follow the plan.
        plan = plan_runtime(model.rope_cos.device, choose_backend(model.rope_cos.device, use_kernels),
                            enforce_eager=enforce_eager, overlap=overlap, num_draft_tokens=num_draft_tokens,
                            max_num_seqs=max_num_seqs, cuda_graph_max_batch=cuda_graph_max_batch)
        num_draft_tokens = plan.num_draft_tokens
        self.model = model
        self.config: LlamaConfig = model.config
        self.tokenizer = tokenizer
        self.device = model.rope_cos.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        self.kv_cache_dtype = _kv_cache_dtype(kv_cache_dtype, self.dtype)
        if num_blocks is None:
            num_blocks = num_blocks_for_budget(self.config, block_size, self.kv_cache_dtype, self.device,
                                               kv_cache_bytes, gpu_memory_utilization,
                                               max_num_seqs=max_num_seqs, max_model_len=self.max_model_len)
        _positive(num_blocks=num_blocks)
        self.block_size = block_size
        scales = fp8_kv_scales(model) if self.kv_cache_dtype == FP8_KV_DTYPE else None
        self.kv_caches = allocate_kv_caches(self.config, num_blocks, block_size, self.kv_cache_dtype, self.device,
                                            scales)
        self.scheduler = Scheduler(BlockManager(num_blocks, block_size, enable_prefix_caching), max_num_seqs,
                                   max_num_batched_tokens)
        self.backend = plan.backend
        if self.backend == TRITON and self.kv_cache_dtype == FP8_KV_DTYPE and \
                torch.cuda.get_device_capability(self.device) < (8, 9):
            raise EngineConfigError("kv_cache_dtype='fp8' on the Triton kernels needs a GPU with an e4m3 type "
                                    "(sm_89 or later: Ada, Hopper); use kv_cache_dtype='auto' here")
        model.set_backend(self.backend)
        self.runner = ModelRunner(model, self.kv_caches, block_size, self.device, self.backend)
        if plan.capture_graphs:
            self.runner.capture_graphs(plan.graph_max_batch, self.max_model_len)
        self.reflection_groups = reflection_groups(tokenizer)
        # On the CPU nothing runs asynchronously, so overlapping would only waste the steps it drops.
        self.overlap = plan.overlap
        self.requests = Requests(tokenizer, self.config.vocab_size, self.max_model_len, num_blocks, block_size, seed)
        self.seqs = self.requests.seqs
        self.num_draft_tokens = num_draft_tokens
        self.stepper = Stepper(self.scheduler, self.runner, tokenizer, self.max_model_len, self.reflection_groups,
                               self.backend, self.overlap, num_draft_tokens)
        # Requests sampled several times (n, best_of > 1), by request id, and the request of each sample.
        self.groups: dict[int, SampleGroup] = {}
        self.group_of: dict[int, SampleGroup] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "auto",
                        dtype: torch.dtype | str | None = None, quantization: str | None = None,
                        progress: bool = True, revision: str | None = None, download: bool = False,
                        **engine_kwargs) -> "Engine":
        """Loads a Hugging Face Llama checkpoint (weights, config and tokenizer): a directory, a model id in the
        Hugging Face cache (at `revision`; fetched when `download` and online), or "tiny" (`hub.resolve_model`).

        device "auto" is CUDA when there is one, else the CPU; dtype defaults to the checkpoint's on CUDA and
        float32 on the CPU; quantization None or "fp8".
        Engine options (README lists them): block_size, num_blocks or kv_cache_bytes or gpu_memory_utilization,
        max_num_seqs, max_num_batched_tokens, max_model_len, enable_prefix_caching, use_kernels (default: on
        CUDA), enforce_eager (no CUDA graphs), cuda_graph_max_batch, overlap (default: on CUDA),
        num_draft_tokens (exact speculative decoding, 0 = off; default: 4 on CUDA, off on the CPU),
        kv_cache_dtype ("auto": the model's dtype; "fp8": float8 e4m3 keys and values, twice the tokens), seed.
        """
        path = check_checkpoint_dir(resolve_model(path, revision, download=download))
        dev = device_of(device)
        tokenizer = Tokenizer.from_pretrained(path)
        model = load_model(path, device=dev, dtype=dtype, quantization=quantization, progress=progress)
        return cls(model, tokenizer, **engine_kwargs)

    # ---- requests -------------------------------------------------------------------------------

    def next_request_id(self) -> int:
        """A fresh request id, for `request_id=` / `request_ids=` (safe to call from any thread)."""
        return self.requests.reserve_id()

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    keep_cache: bool = False, request_id: int | None = None) -> int:
        """Queues a prompt (text, encoded with BOS, or token ids); returns its request id. With keep_cache
        the finished request keeps its KV blocks so it can be forked; `release` frees them. With n or best_of
        > 1 the prompt is computed once and its samples fork off its cache (engine/sample_groups.py)."""
        params = params or SamplingParams()
        ids = self.requests.prompt_ids(prompt)
        if isinstance(params, SamplingParams) and params.num_samples > 1:
            return self._add_group(ids, params, keep_cache, request_id)
        seq = self.requests.new(ids, params, keep_cache, request_id=request_id)
        self.scheduler.add(seq)
        return seq.request_id

    def _add_group(self, ids: list[int], params: SamplingParams, keep_cache: bool, request_id: int | None) -> int:
        if keep_cache:
            raise RequestError("keep_cache is for a request to fork from, which n or best_of > 1 is not")
        if len(ids) < 2:
            raise RequestError("n or best_of > 1 needs a prompt of at least 2 tokens (the samples fork off it)")
        k = params.num_samples
        self.requests.check_fits(len(ids), params.max_tokens, "prompt")
        blocks = -(-len(ids) // self.block_size) + k * -(-params.max_tokens // self.block_size) + k
        if blocks > self.requests.pool_blocks:
            raise CacheCapacityError(f"a prompt of {len(ids)} tokens sampled {k} times with max_tokens="
                                     f"{params.max_tokens} needs up to {blocks} KV blocks but the whole pool has "
                                     f"{self.requests.pool_blocks}")
        for p in sample_params(params):
            self.requests.check_servable(p)
        seq = self.requests.new(ids[:-1], prompt_params(params), keep_cache=True, request_id=request_id)
        seq.prefill_only, seq.lookahead = True, ids[-1:]
        self.groups[seq.request_id] = SampleGroup(seq, params)
        self.scheduler.add(seq)
        return seq.request_id

    def _fork_samples(self, prompt) -> None:
        """The prompt of a sampled request is computed: its samples fork off its blocks, which it lets go of."""
        group = self.groups[prompt.request_id]
        params = sample_params(group.params)
        samples = self.requests.branches(prompt, [prompt.lookahead] * len(params), params, None, keep_cache=False)
        self.scheduler.fork(prompt, samples)
        self.scheduler.free(prompt)
        prompt.status = Status.FINISHED
        group.samples = samples
        for s in samples:
            self.group_of[s.request_id] = group

    def _step(self) -> tuple[list[int], bool]:
        """One step; the ids of the requests it finished (a sampled request once all its samples are done)."""
        finished, progressed = self.stepper.step()
        ids = []
        for s in finished:
            group = self.group_of.get(s.request_id)
            if s.prefill_only and s.request_id in self.groups:
                self._fork_samples(s)
            elif group is None:
                ids.append(s.request_id)
            elif group.done and group.request_id not in ids:
                ids.append(group.request_id)
        return ids, progressed

    def fork(self, request_id: int, suffixes: Iterable[str | Seq[int]],
             params: SamplingParams | Seq[SamplingParams], prefix_len: int | None = None,
             keep_cache: bool = False, request_ids: Seq[int] | None = None) -> list[int]:
        """New requests that continue from the request's first `prefix_len` tokens (default: all of them)
        followed by their own suffix, sharing its cached blocks. Text suffixes are encoded without BOS.

        The request must hold its cache (running with its prompt computed, or finished with keep_cache).
        prefix_len may drop its last sampled token (whose K/V is not computed yet), not computed tokens.
        """
        p = self.requests.get(request_id)
        if request_id in self.groups:
            raise RequestError(f"request {request_id} samples n or best_of > 1: there is no one cache to fork from")
        self.stepper.cancel_in_flight(p)
        if p.status not in (Status.RUNNING, Status.PAUSED):
            raise RequestError(f"request {request_id} holds no KV cache to fork from (status {p.status.value})")
        children = self.requests.branches(p, suffixes, params, prefix_len, keep_cache, request_ids)
        try:
            self.scheduler.fork(p, children)
        except BaseException:
            for c in children:
                del self.seqs[c.request_id]
            raise
        return [c.request_id for c in children]

    def release(self, request_id: int) -> None:
        """Frees a request's KV blocks (a paused fork parent, or an unfinished request, which is aborted)."""
        seq = self.requests.get(request_id)
        if request_id in self.groups:
            for s in self.groups[request_id].samples:
                self.release(s.request_id)
        self.stepper.cancel_in_flight(seq)
        self.scheduler.remove(seq)
        self.scheduler.free(seq)
        if seq.status != Status.FINISHED:
            seq.finish_reason = seq.finish_reason or "abort"
        seq.status = Status.FINISHED

    def forget(self, request_id: int) -> None:
        """Drops the record of a request (its output can no longer be read), freeing its blocks if it holds any."""
        if self.requests.get(request_id).status != Status.FINISHED or request_id in self.groups:
            self.release(request_id)
        group = self.groups.pop(request_id, None)
        for s in group.samples if group is not None else ():
            del self.group_of[s.request_id]
            del self.seqs[s.request_id]
        del self.seqs[request_id]

    def is_done(self, request_id: int) -> bool:
        seq = self.requests.get(request_id)
        if request_id in self.groups:
            return self.groups[request_id].done
        return seq.status in (Status.PAUSED, Status.FINISHED)

    def output(self, request_id: int) -> RequestOutput:
        seq = self.requests.get(request_id)
        if request_id in self.groups:
            return group_output(self.groups[request_id], self.reflection_groups)
        return request_output(seq, self.reflection_groups)

    def has_request(self, request_id: int) -> bool:
        """Whether the engine still keeps a record of the request (not forgotten)."""
        return request_id in self.seqs

    def num_output_tokens(self, request_id: int) -> int:
        """Tokens generated so far (by all its samples): cheaper than `output` for a caller that polls for new ones."""
        seq = self.requests.get(request_id)
        if request_id in self.groups:
            return sum(s.num_output_tokens for s in self.groups[request_id].samples)
        return seq.num_output_tokens

    def num_prompt_tokens(self, request_id: int) -> int:
        seq = self.requests.get(request_id)
        return seq.num_prompt_tokens + len(seq.lookahead)

    def has_work(self) -> bool:
        """Whether a step would compute something: requests are waiting or running."""
        return self.scheduler.has_work()

    def num_running(self) -> int:
        return len(self.scheduler.running)

    # ---- stepping -------------------------------------------------------------------------------

    def step(self) -> list[int]:
        """Runs one model step over the scheduled batch; returns the ids of requests that finished in it
        (see engine/stepping.py for overlapped steps and what an exception inside a step leaves)."""
        return self._step()[0]

    def step_deltas(self) -> list[Delta]:
        """Runs one model step; returns a `Delta` for every request it touched: the new token ids with their
        log-probabilities, the text they made final, and the finish reason on a request's last delta. A
        request's deltas, joined, are its output (`output(request_id).text`, `.token_ids`); the work per step
        is that of the step's rows, whatever the length of the outputs or the number of requests waiting."""
        self._step()
        return relabel([d for d in map(take_delta, self.stepper.touched) if d is not None], self.group_of)

    def run_until_any(self, request_ids: Iterable[int]) -> list[int]:
        """Steps until at least one listed request is done; returns the listed ones that are, those that
        finished in the last step first, in the order they finished. Raises SchedulingError when a step
        can compute nothing while they wait."""
        ids = list(request_ids)
        while True:
            done = [i for i in ids if self.is_done(i)]
            if done or not ids:
                return done
            finished, progressed = self._step()
            if not progressed:
                raise SchedulingError(f"requests {sorted(ids)} cannot make progress: the scheduler has "
                                      f"nothing it can run ({len(self.scheduler.waiting)} waiting, "
                                      f"{len(self.scheduler.running)} running)")
            first = [i for i in finished if i in ids]
            if first:
                return first + [i for i in ids if i not in first and self.is_done(i)]

    def run(self, request_ids: Iterable[int], progress: bool = False) -> list[RequestOutput]:
        """Steps until every listed request is done; returns their outputs in order."""
        ids = list(request_ids)
        pending = dict.fromkeys(ids)
        with tqdm(total=len(pending), desc="generating", unit="req", disable=not progress) as bar:
            while pending:
                done = self.run_until_any(pending)
                for i in done:
                    del pending[i]
                bar.update(len(done))
        return [self.output(i) for i in ids]

    def generate(self, prompts: str | Seq[int] | Seq[str | Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Generates for each prompt (text or token ids) in one continuous batch."""
        prompts, params = batch_of(prompts, params)
        ids: list[int] = []
        try:
            ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
            return self.run(ids, progress=progress)
        finally:
            for i in ids:
                self.forget(i)

    # ---- scoring --------------------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, token_ids: Seq[int] | str) -> torch.Tensor:
        """Logits [len, vocab] (float32) for every position of a prompt, computed through the paged cache in
        chunks of at most max_num_batched_tokens, as a request that samples nothing."""
        rid = self.add_scored(token_ids)
        try:
            self.run([rid])
            return self.scored_logits(rid)
        finally:
            self.forget(rid)

    def add_scored(self, token_ids: Seq[int] | str, request_id: int | None = None) -> int:
        """Queues a prompt to be scored (`score` in parts, for a caller that steps the engine itself): once it
        is done, `scored_logits` reads its logits."""
        seq = self.requests.new(self.requests.prompt_ids(token_ids), SamplingParams(max_tokens=1),
                                keep_cache=False, scores=True, request_id=request_id)
        self.scheduler.add(seq)
        return seq.request_id

    def scored_logits(self, request_id: int) -> torch.Tensor:
        seq = self.requests.get(request_id)
        if not seq.scores or seq.status != Status.FINISHED:
            raise RequestError(f"request {request_id} is not a scored prompt that is done")
        return torch.cat([seq.logits[k] for k in sorted(seq.logits)])

    def is_scored(self, request_id: int) -> bool:
        return self.requests.get(request_id).scores

    def cache_stats(self) -> dict[str, int]:
        """Blocks by state, and the pool's size: `kv_cache_bytes` (all layers' keys and values, scales
        included), `kv_bytes_per_token`, `kv_capacity_tokens` (num_blocks * block_size)."""
        stats = self.scheduler.cache_stats()
        per_token = kv_bytes_per_token(self.config, self.kv_cache_dtype)
        scale_bytes = sum(2 * c.k_scale.numel() * c.k_scale.element_size() for c in self.kv_caches if c.fp8)
        stats.update(kv_cache_bytes=per_token * stats["num_blocks"] * stats["block_size"] + scale_bytes,
                     kv_bytes_per_token=per_token, kv_capacity_tokens=stats["num_blocks"] * stats["block_size"])
        return stats

    def speculation_stats(self) -> dict[str, float]:
        """Model calls, tokens, drafted and accepted draft tokens so far (engine/speculative.py)."""
        return self.stepper.stats.as_dict()
