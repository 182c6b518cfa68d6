"""A program's view of an `EngineLoop`: code that drives requests itself (the Self-RAG algorithms: add a prompt,
fork K branches, wait, score) runs on a worker thread against a `ProgramView`, an `EngineClient` whose
operations reach the engine as one-way messages to the loop's thread.

- `add_request`, `fork`, `release`, `forget` and `score`'s request are posted and return at once: the view picks
  the new requests' ids itself (`Engine.next_request_id`), so nothing waits for the loop to answer. The loop
  carries the messages out in order, between two steps; one that fails (a bad prompt, a fork of a request
  that holds no cache) fails the program at its next wait, naming the error.
- `run` and `run_until_any` wait on the program's mailbox: when a step finishes one of the program's
  requests, the loop puts its `RequestOutput` there and wakes the program. Waiting costs the loop nothing per
  step and the program nothing until it is woken; no gather window, no polling.
- Cancellation (`ProgramHandle.cancel`), the deadline, a failed step and the loop's closing all wake a waiting
  program, which then raises `Cancelled`, `DeadlineExceeded` or the step's error; every request it holds is
  freed.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Sequence

import torch

from selfrag_engine.engine.llm_engine import Engine
from selfrag_engine.engine.output import RequestOutput
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.errors import Cancelled, DeadlineExceeded, SchedulingError


class ProgramState:
    """What the loop and a program share: the program's requests and its mailbox, under one condition.

    The program thread adds to `ids` as it posts requests; the loop thread fills `done` (request id -> its
    output, or a scored prompt's logits, in the order they finished) and sets `error` / `stalled`."""

    def __init__(self, deadline: float | None):
        self.cond = threading.Condition()
        self.ids: set[int] = set()
        self.done: dict[int, Any] = {}
        self.error: BaseException | None = None
        self.cancelled = False
        self.deadline = deadline
        self.waiting = False  # in run/run_until_any: the loop may tell it that nothing can make progress
        self.stalled = False

    def deliver(self, request_id: int, value: Any) -> None:
        """Loop thread: a request of the program is done."""
        with self.cond:
            self.done[request_id] = value
            self.cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """Loop thread (or a canceller): the program fails at its next wait or call."""
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()

    def check(self) -> None:
        """Raises what ended the program, if anything did (its error, cancellation, the deadline)."""
        if self.error is not None:
            raise self.error
        if self.cancelled:
            raise Cancelled("the query was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.cancelled = True
            raise DeadlineExceeded("the query passed its deadline")


class ProgramView:
    """An `EngineClient` for a program on a worker thread (see the module docstring). The attributes the
    algorithms read (tokenizer, config, max_model_len, reflection_groups) are the engine's own, immutable after
    construction. One view per program; it is not shared between threads."""

    def __init__(self, engine: Engine, post: Callable[[Callable[[], None]], None], state: ProgramState,
                 owners: dict[int, ProgramState]):
        self._engine = engine
        self._post = post
        self._state = state
        self._owners = owners  # request id -> its program: the loop's table, written on the loop thread only
        self.tokenizer = engine.tokenizer
        self.config = engine.config
        self.max_model_len = engine.max_model_len
        self.reflection_groups = engine.reflection_groups

    # -- one-way operations -----------------------------------------------------------------------------------

    def _send(self, ids: list[int], op: Callable[[], None]) -> None:
        """Posts op, to run on the loop thread; the requests it makes belong to the program from then on."""
        state, owners = self._state, self._owners

        def run() -> None:
            try:
                op()
            except Exception as e:  # noqa: BLE001 - the program learns of it where it waits
                state.fail(e)
                return
            for rid in ids:
                owners[rid] = state

        with state.cond:
            state.ids.update(ids)
        self._post(run)

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    keep_cache: bool = False) -> int:
        self._state.check()
        rid = self._engine.next_request_id()
        self._send([rid], lambda: self._engine.add_request(prompt, params, keep_cache, request_id=rid))
        return rid

    def fork(self, request_id: int, suffixes: Iterable[str | Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams], prefix_len: int | None = None,
             keep_cache: bool = False) -> list[int]:
        self._state.check()
        if not isinstance(suffixes, str):  # one string is refused by the engine, naming the mistake
            suffixes = list(suffixes)
        n = 1 if isinstance(suffixes, str) else len(suffixes)
        rids = [self._engine.next_request_id() for _ in range(n)]
        self._send(rids, lambda: self._engine.fork(request_id, suffixes, params, prefix_len, keep_cache,
                                                   request_ids=rids))
        return rids

    def release(self, request_id: int) -> None:
        self._post(lambda: release_all(self._engine, [request_id]))

    def forget(self, request_id: int) -> None:
        state = self._state
        with state.cond:
            state.ids.discard(request_id)
            state.done.pop(request_id, None)
        self._post(lambda: forget_all(self._engine, [request_id], self._owners))

    # -- waits ------------------------------------------------------------------------------------------------

    def _wait(self, ids: list[int], wait_for_all: bool) -> list[int]:
        """The listed requests done: all of them, or (not wait_for_all) at least one, in list order if some were
        done already, else in the order they finished."""
        state = self._state
        with state.cond:
            state.waiting, state.stalled = True, False
            try:
                waited = False
                while True:
                    state.check()
                    done = [i for i in ids if i in state.done]
                    if len(done) == len(ids) or (done and not wait_for_all):
                        if waited and not wait_for_all:
                            order = {rid: at for at, rid in enumerate(state.done)}
                            done.sort(key=order.__getitem__)
                        return done
                    if state.stalled:
                        raise SchedulingError(f"requests {ids} cannot make progress: nothing is scheduled")
                    timeout = None if state.deadline is None else max(0.0, state.deadline - time.monotonic())
                    state.cond.wait(timeout)
                    waited = True
            finally:
                state.waiting = False

    def run(self, request_ids: Iterable[int], progress: bool = False) -> list[RequestOutput]:
        ids = list(request_ids)
        self._wait(ids, wait_for_all=True)
        return [self._state.done[i] for i in ids]

    def run_until_any(self, request_ids: Iterable[int]) -> list[int]:
        ids = list(request_ids)
        return self._wait(ids, wait_for_all=False) if ids else []

    def is_done(self, request_id: int) -> bool:
        with self._state.cond:
            return request_id in self._state.done

    def output(self, request_id: int) -> RequestOutput:
        """A done request's output from the mailbox; an unfinished one's, read on the loop thread."""
        with self._state.cond:
            if request_id in self._state.done:
                return self._state.done[request_id]
        self._state.check()
        fut: Future = Future()

        def read() -> None:
            try:
                fut.set_result(self._engine.output(request_id))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

        self._post(read)
        return fut.result()

    def score(self, token_ids: Sequence[int] | str) -> torch.Tensor:
        """Logits of every position of a prompt: a scored request, run with everyone's rows."""
        self._state.check()
        rid = self._engine.next_request_id()
        self._send([rid], lambda: self._engine.add_scored(token_ids, request_id=rid))
        try:
            return self.run([rid])[0]
        finally:
            self.forget(rid)

    def release_everything(self) -> None:
        """At the program's end (normal or not): every request it still holds is forgotten (one-way)."""
        with self._state.cond:
            ids = list(self._state.ids)
            self._state.ids.clear()
        if ids:
            try:
                self._post(lambda: forget_all(self._engine, ids, self._owners))
            except Cancelled:
                pass  # the loop is closed: nothing holds the blocks any more


class ProgramHandle(Future):
    """The future of a program's result; `cancel()` also stops the program (at its next engine call, or at
    once if it is waiting) and frees every KV block its requests hold."""

    def __init__(self, state: ProgramState, inner: Future, free: Callable[[list[int]], None]):
        super().__init__()
        self._state = state
        self._inner = inner
        self._free = free
        inner.add_done_callback(self._copy)

    def _copy(self, inner: Future) -> None:
        if self.done():
            return
        if inner.cancelled():
            super().cancel()
            self.set_running_or_notify_cancel()
        elif inner.exception() is not None:
            self.set_exception(inner.exception())
        else:
            self.set_result(inner.result())

    def cancel(self) -> bool:
        if self.done():
            return False
        state = self._state
        with state.cond:
            state.cancelled = True
            state.cond.notify_all()
            ids = list(state.ids)
        self._free(ids)
        return True

    def __await__(self):
        return asyncio.wrap_future(self).__await__()


def release_all(engine: Engine, ids: Iterable[int]) -> None:
    for rid in ids:
        if engine.has_request(rid) and not engine.is_done(rid):
            engine.release(rid)


def forget_all(engine: Engine, ids: Iterable[int], owners: dict[int, ProgramState]) -> None:
    for rid in ids:
        owners.pop(rid, None)
        if engine.has_request(rid):
            engine.forget(rid)
