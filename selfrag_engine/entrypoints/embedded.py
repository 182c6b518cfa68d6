"""The Python side of the C++ API (csrc/include/selfrag_engine/engine.h).

A C++ program that opens a `selfrag::Engine` runs this module in its embedded interpreter. Everything crosses
the boundary as plain dicts, lists, strings and numbers, so the C++ side only converts containers and never
needs to know the engine's Python types. Results come back through callbacks (`on_done(result, error)`)
called on the loop or a streaming thread, which lets a C++ caller wait on a `std::future` without holding
the GIL. `error` is `(kinds, message)`: the exception's class name followed by its named bases (most specific
first, ending with "SelfragEngineError"), or just its class name for an error that is not a named one.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, wait
from typing import Any, Callable

from selfrag_engine.engine.llm_engine import Engine
from selfrag_engine.engine.loop import Delta, EngineLoop, RequestHandle
from selfrag_engine.engine.output import RequestOutput
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.errors import Cancelled, RequestError, SelfragEngineError
from selfrag_engine.retrieval.passages import read_passages as _read_passages
from selfrag_engine.selfrag.long_form import LongAnswer, Segment
from selfrag_engine.selfrag.options import (
    QueryOptions,
    answer_record,
    passage_record,
    passages_from,
    segment_record,
)
from selfrag_engine.selfrag.short_form import Answer

Done = Callable[[Any, Any], None]


def error_info(error: BaseException) -> tuple[list[str], str]:
    """(the class name and its named bases, most specific first; the message)."""
    kinds = [c.__name__ for c in type(error).__mro__
             if isinstance(c, type) and issubclass(c, SelfragEngineError)]
    return (kinds or [type(error).__name__]), str(error)


def read_passages(path: str) -> list[dict[str, str | None]]:
    """A passages file in any of `selfrag-engine ask --passages`'s formats (.tsv, .jsonl, .json)."""
    return [_passage(passage_record(p)) for p in _read_passages(path)]


class EmbeddedEngine:
    """An engine and the loop that steps it, opened for a C++ `selfrag::Engine`."""

    def __init__(self, model: str, *, index: str | None = None, encoder: str | None = None,
                 encoder_device: str | None = None, device: str = "auto", dtype: str | None = None,
                 quantization: str | None = None, max_pending: int = 256,
                 engine_options: dict[str, Any] | None = None):
        self.retriever = None
        if index is not None:
            # faiss is imported only by an engine that retrieves.
            from selfrag_engine.retrieval.batched import BatchedSearch
            from selfrag_engine.retrieval.sharded_index import load_retriever

            # The C++ threads' concurrent searches go in batches.
            self.retriever = BatchedSearch(load_retriever(index, encoder=encoder, device=encoder_device))
        self.engine = Engine.from_pretrained(model, device=device, dtype=dtype, quantization=quantization,
                                             progress=False, **(engine_options or {}))
        self.loop = EngineLoop(self.engine, max_pending=max_pending)
        self._queries: set[Future] = set()
        self._queries_lock = threading.Lock()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self.engine.tokenizer.encode(text, add_bos=add_bos)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.engine.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def cache_stats(self) -> dict[str, int]:
        return self.loop.call(self.engine.cache_stats).result()

    def submit(self, prompt: str | list[int], params: dict[str, Any], timeout_s: float | None, on_done: Done,
               on_delta: Callable[[dict[str, Any]], bool] | None = None) -> RequestHandle:
        """Queues a generation. Bad params raise here; a bad prompt fails the request (on_done's error).
        With on_delta, a thread hands each delta over as it comes, and on_done follows the last one;
        on_delta returning False cancels the request."""
        handle = self.loop.submit(prompt, SamplingParams(**params), timeout_s=timeout_s)
        if on_delta is None:
            handle.future.add_done_callback(lambda fut: _report(fut, _completion, on_done))
        else:
            threading.Thread(target=_pump, args=(handle, on_delta, on_done), daemon=True,
                             name=f"selfrag-stream-{id(handle):x}").start()
        return handle

    def ask(self, question: str, options: dict[str, Any], on_done: Done,
            on_segment: Callable[[dict[str, Any]], bool] | None = None) -> Future:
        """Starts a Self-RAG query on the loop (options as AnswerOptions in engine.h); returns its handle,
        whose cancel() frees every block of its requests. on_segment (long form) gets each segment as soon as
        it is certain, on the query's thread; when it returns False the query stops (its blocks are freed)."""
        if not question.strip():
            raise RequestError("question: the question is empty")
        # The C++ AnswerOptions' unset threshold (None) lets the model's own first token decide.
        query = QueryOptions.from_mapping({"threshold": None, **options}, max_new_tokens="max_tokens")
        passages = passages_from(options.get("passages"))
        if passages is None and self.retriever is None and query.mode != "never":
            raise RequestError("passages: give passages, open the engine with an index, or use mode 'never'")

        def segment(seg: Segment) -> None:
            if not on_segment(_segment(seg)):
                raise Cancelled("the segment callback failed")

        def program(shared) -> dict[str, Any]:
            runner = query.runner(shared, self.retriever)
            if query.form == "short":
                return _answer(runner.answer(question, passages))
            return _answer(runner.answer(question, passages, on_segment=None if on_segment is None else segment))

        handle = self.loop.run_program(program, timeout_s=options.get("timeout_s"))
        with self._queries_lock:
            self._queries.add(handle)

        def done(fut: Future) -> None:
            with self._queries_lock:
                self._queries.discard(fut)
            _report(fut, lambda r: r, on_done)

        handle.add_done_callback(done)
        return handle

    def close(self, timeout_s: float = 10.0) -> None:
        """Queries in flight are cancelled and given until their next engine call to see it (a program that
        waited on a closed loop would never return); then the loop stops, failing its requests with
        Cancelled."""
        with self._queries_lock:
            queries = list(self._queries)
        for q in queries:
            q.cancel()
        wait(queries, timeout=timeout_s)
        self.loop.close()
        if self.retriever is not None:
            self.retriever.close()


def _report(fut: Future, convert: Callable[[Any], Any], on_done: Done) -> None:
    if fut.cancelled():
        on_done(None, error_info(Cancelled("the query was cancelled")))
    elif fut.exception() is not None:
        on_done(None, error_info(fut.exception()))
    else:
        try:
            result = convert(fut.result())
        except Exception as e:  # noqa: BLE001 - a conversion bug still reaches the waiting caller
            on_done(None, error_info(e))
            return
        on_done(result, None)


def _pump(handle: RequestHandle, on_delta: Callable[[dict[str, Any]], bool], on_done: Done) -> None:
    try:
        for delta in handle.deltas():
            if not on_delta(_delta(delta)):
                handle.cancel()  # the C++ caller's callback threw: nothing more is wanted
                break
    except BaseException as e:  # noqa: BLE001 - the caller's future gets every failure
        on_done(None, error_info(e))
        return
    _report(handle.future, _completion, on_done)


def _delta(d: Delta) -> dict[str, Any]:
    return {"token_ids": list(d.token_ids), "text": d.text, "finish_reason": d.finish_reason or ""}


def _completion(out: RequestOutput) -> dict[str, Any]:
    stop = out.stop_reason
    result: dict[str, Any] = {
        "prompt_token_ids": list(out.prompt_token_ids), "token_ids": list(out.token_ids), "text": out.text,
        "finish_reason": out.finish_reason or "",
        "stop_string": stop if isinstance(stop, str) else "",
        "stop_token_id": stop if isinstance(stop, int) else -1,
        "cumulative_logprob": float(out.cumulative_logprob),
        "token_logprobs": [float(x) for x in out.token_logprobs],
        # Most likely first, as a caller reading the top entries expects.
        "top_logprobs": [sorted(((int(t), float(v)) for t, v in step.items()), key=lambda tv: (-tv[1], tv[0]))
                         for step in out.logprobs] if out.logprobs is not None else [],
        "reflection_groups": [], "reflection_token_ids": [], "reflection_probs": [],
    }
    if out.reflection_probs is not None and out.reflection_groups is not None:
        result["reflection_groups"] = list(out.reflection_groups.names)
        result["reflection_token_ids"] = [list(g) for g in out.reflection_groups.ids]
        result["reflection_probs"] = out.reflection_probs.double().tolist()
    return result


def _passage(p: dict[str, Any] | None) -> dict[str, str] | None:
    # C++ reads every passage field as a string: no id is "".
    return None if p is None else {**p, "id": "" if p["id"] is None else p["id"]}


def _segment(seg: Segment) -> dict[str, Any]:
    record = segment_record(seg)
    return {**record, "passage": _passage(record["passage"])}


def _answer(ans: Answer | LongAnswer) -> dict[str, Any]:
    """The answer's record in the C++ Answer's terms: no best branch is -1, the short form's citations []."""
    r = answer_record(ans)
    return {**r, "best": -1 if r["best"] is None else r["best"],
            "branches": [{**b, "passage": _passage(b["passage"])} for b in r["branches"]],
            "citations": [_passage(c) for c in r["citations"] or []],
            "segments": [{**g, "passage": _passage(g["passage"])} for g in r["segments"]]}
