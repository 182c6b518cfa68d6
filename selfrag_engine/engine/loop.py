"""One thread that owns an engine's stepping, so that many users share each model step.

Requests come from any thread or coroutine (`EngineLoop.submit`) and get a `RequestHandle`: a future of the
final `RequestOutput`, a stream of token deltas (sync or async), and `cancel()`. Code that drives requests
itself, as the Self-RAG algorithms do (add a prompt, fork K branches, wait, score), runs on a worker thread
against a `SharedEngine`: an Engine-shaped view whose every call is carried out by the loop thread between
steps, and whose `run` waits while the loop steps everything that is live. The rows of all users' requests,
branches and tree nodes therefore meet in the same model steps, and only the loop thread ever touches the
engine.

Limits: at most `max_pending` requests and programs admitted at once (`QueueFullError` beyond), a per-request
deadline (the request is aborted and its handle fails with `DeadlineExceeded`), and cancellation, which frees
every KV block of the request, or of a program's requests, at the next step.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from selfrag_engine.engine.llm_engine import Engine, RequestOutput
from selfrag_engine.engine.output import Delta
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.errors import (
    Cancelled,
    DeadlineExceeded,
    QueueFullError,
    RequestError,
    SchedulingError,
)

T = TypeVar("T")


class RequestHandle:
    """A request submitted to the loop: wait for it (`result`, `await handle`), stream it (`deltas`,
    `async for delta in handle`) or `cancel` it. Thread-safe."""

    def __init__(self, loop: "EngineLoop", deadline: float | None):
        self._loop = loop
        self.request_id: int | None = None
        self.num_prompt_tokens: int | None = None  # once the engine took the request
        self.deadline = deadline
        self.future: Future[RequestOutput] = Future()
        self.accepted: Future[int] = Future()  # the request id once the engine took the request
        self._events: list[Delta] = []
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancelled = False
        self._on_finish: Callable[[], None] | None = None  # frees the admission slot, before the future is done

    # -- consumer side ----------------------------------------------------------------------------------

    def result(self, timeout: float | None = None) -> RequestOutput:
        return self.future.result(timeout)

    def __await__(self):
        return asyncio.wrap_future(self.future).__await__()

    def cancel(self) -> None:
        """Aborts the request; its blocks are freed at the next step. A finished request stays finished."""
        if not self.future.done():
            self.cancelled = True
            self._loop._post(lambda: self._loop._abort(self, Cancelled("request cancelled")))

    def deltas(self, timeout: float | None = None) -> Iterator[Delta]:
        """The request's deltas as they come; raises the request's error, if it fails."""
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events) and not self.future.done():
                    if not self._cond.wait(timeout):
                        raise TimeoutError("no output within the timeout")
                batch, i = self._events[i:], len(self._events)
                done = self.future.done()
            yield from batch
            if done and i >= len(self._events):
                self.future.result()  # raises the failure, if any
                return

    async def __aiter__(self) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._cond:
            self._async_waiters.append((loop, event))
        i = 0
        try:
            while True:
                with self._cond:
                    batch, i = self._events[i:], len(self._events)
                    done = self.future.done()
                    if not batch and not done:
                        event.clear()
                for d in batch:
                    yield d
                if done and not batch:
                    self.future.result()
                    return
                if not batch:
                    await event.wait()
        finally:
            with self._cond:
                self._async_waiters.remove((loop, event))

    # -- loop side ----------------------------------------------------------------------------------------

    def _push(self, delta: Delta) -> None:
        with self._cond:
            self._events.append(delta)
            self._cond.notify_all()
            waiters = list(self._async_waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def _finish(self, out: RequestOutput | None, error: BaseException | None) -> None:
        if not self.accepted.done():
            if error is not None:
                self.accepted.set_exception(error)
            else:
                self.accepted.set_result(self.request_id)
        with self._cond:
            if self.future.done():
                return
            if self._on_finish is not None:
                self._on_finish()
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(out)
            self._cond.notify_all()
            waiters = list(self._async_waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)


@dataclass
class _Program:
    """A worker-thread program's requests, so that cancelling it frees them all."""
    ids: set[int] = field(default_factory=set)
    cancelled: bool = False
    deadline: float | None = None
    error: BaseException | None = None  # a failed model step that held some of its requests
    wake: threading.Event | None = None  # what the program waits on now, so that cancel() can wake it


class EngineLoop:
    """Owns `engine` from a background thread. `submit` / `call` / `run_program` from any thread.

    max_pending: requests (via submit) plus programs (via run_program) admitted at once.
    program_workers: threads that run programs; a program waiting on the loop holds one.
    gather_s, gap_s: after carrying out calls, when nothing else runs, the loop waits up to gather_s for more
        while they keep coming less than gap_s apart, so that a program's chain of calls (wait, output, fork)
        joins one step.

    A program waiting for its requests is woken when one of them finishes, not at every step.
    """

    def __init__(self, engine: Engine, *, max_pending: int = 256, program_workers: int = 64,
                 idle_wait_s: float = 0.05, gather_s: float = 0.02, gap_s: float = 0.003):
        if max_pending < 1:
            raise RequestError(f"max_pending must be at least 1, got {max_pending}")
        self.engine = engine
        self.max_pending = max_pending
        self._idle_wait_s = idle_wait_s
        self._gather_s, self._gap_s = gather_s, gap_s
        self._ops: list[Callable[[], None]] = []
        self._ops_lock = threading.Lock()
        self._wake = threading.Event()
        self._stepped = threading.Condition()
        self._handles: dict[int, RequestHandle] = {}
        # When each request finished: (step, place among that step's finished), for programs waiting on any.
        self._finished_at: dict[int, tuple[int, int]] = {}
        self._program_states: dict[int, _Program] = {}
        # Programs waiting for some of their requests to finish: (ids, event). Loop thread only.
        self._waiters: list[tuple[set[int], threading.Event]] = []
        self._pending = 0  # admitted requests and programs not yet finished
        self._pending_lock = threading.Lock()
        self._stop = False
        self._error: BaseException | None = None
        self._workers = ThreadPoolExecutor(max_workers=program_workers, thread_name_prefix="selfrag-program")
        self.stats = LoopStats()
        self._thread = threading.Thread(target=self._main, name="selfrag-engine-loop", daemon=True)
        self._thread.start()

    # -- admission -----------------------------------------------------------------------------------------

    def _admit(self) -> None:
        with self._pending_lock:
            if self._pending >= self.max_pending:
                self.stats.rejected += 1
                raise QueueFullError(f"{self._pending} requests are in flight, the most this server admits "
                                     f"({self.max_pending}); retry later")
            self._pending += 1

    def _release_slot(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    @property
    def pending(self) -> int:
        return self._pending

    # -- requests ------------------------------------------------------------------------------------------

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
               timeout_s: float | None = None) -> RequestHandle:
        """Queues a prompt; returns at once. Bad prompts and params fail the handle with RequestError."""
        self._check_running()
        self._admit()
        handle = RequestHandle(self, None if timeout_s is None else time.monotonic() + timeout_s)
        handle._on_finish = self._release_slot
        params = params or SamplingParams()

        def add() -> None:
            if handle.cancelled:
                handle._finish(None, Cancelled("request cancelled"))
                return
            try:
                rid = self.engine.add_request(prompt, params)
            except Exception as e:  # noqa: BLE001 - the submitter gets the named error
                handle._finish(None, e)
                return
            handle.request_id = rid
            handle.num_prompt_tokens = self.engine.num_prompt_tokens(rid)
            handle.accepted.set_result(rid)
            self._handles[rid] = handle
            self.stats.submitted += 1

        self._post(add)
        return handle

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Runs fn(*args, **kwargs) on the loop thread between two steps."""
        self._check_running()
        fut: Future[T] = Future()

        def op() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

        self._post(op)
        return fut

    def run_program(self, program: Callable[["SharedEngine"], T], *, timeout_s: float | None = None
                    ) -> "ProgramHandle[T]":
        """Runs program(shared_engine) on a worker thread; its engine calls are carried out by the loop."""
        self._check_running()
        self._admit()
        state = _Program(deadline=None if timeout_s is None else time.monotonic() + timeout_s)
        shared = SharedEngine(self, state)
        self._program_states[id(state)] = state

        def body() -> T:
            try:
                return program(shared)
            finally:
                shared._release_all()
                self._program_states.pop(id(state), None)
                self._release_slot()

        return ProgramHandle(self, state, self._workers.submit(body))

    # -- the loop --------------------------------------------------------------------------------------------

    def _post(self, op: Callable[[], None]) -> None:
        with self._ops_lock:
            self._ops.append(op)
        self._wake.set()

    def _check_running(self) -> None:
        if self._stop:
            raise Cancelled("the engine loop is closed")
        if self._error is not None:
            raise RuntimeError(f"the engine loop failed: {self._error!r}") from self._error

    def _main(self) -> None:
        try:
            self._serve()
        finally:
            # Operations that came in while the loop stopped still get their answer, so no caller waits on
            # a future nobody will complete; later calls are refused by _check_running.
            while True:
                with self._ops_lock:
                    ops, self._ops = self._ops, []
                if not ops:
                    break
                for op in ops:
                    op()
            with self._stepped:
                self._stepped.notify_all()

    def _run_ops(self) -> int:
        self._wake.clear()
        with self._ops_lock:
            ops, self._ops = self._ops, []
        for op in ops:
            op()
        return len(ops)

    def _serve(self) -> None:
        while not self._stop:
            if self._run_ops() and not self.engine.has_work():
                # A program answered here usually calls again at once (the output after a wait, the fork
                # after the output): while calls keep coming, wait a moment for them, so that they join the
                # next step instead of waiting one out. Only while the engine would idle: with work to run,
                # the wait would hold every other row back, and a late call joins the step after.
                until = time.perf_counter() + self._gather_s
                while (left := until - time.perf_counter()) > 0 and self._wake.wait(min(left, self._gap_s)):
                    self._run_ops()
            self._expire()
            if self.engine.has_work():
                t0 = time.perf_counter()
                try:
                    deltas = self.engine.step_deltas()
                except Exception as e:  # noqa: BLE001 - every waiter learns of it; the loop goes on
                    self._fail_all(e)
                    deltas = []
                self.stats.step_seconds += time.perf_counter() - t0
                finished = [d.request_id for d in deltas if d.finished]
                for order, rid in enumerate(finished):
                    self._finished_at[rid] = (self.stats.steps, order)
                self._publish(deltas)
                self._wake_waiters(set(finished))
                with self._stepped:
                    self.stats.steps += 1
                    self._stepped.notify_all()
            else:
                self._wake_waiters(None)  # nothing runs: waiting programs re-check their state
                with self._stepped:
                    self._stepped.notify_all()
                self._wake.wait(self._idle_wait_s)

    def _watch(self, ids: Sequence[int], event: threading.Event, wait_for_all: bool) -> tuple[list[int], bool]:
        """On the loop thread: (the listed requests already done, whether the engine has work). When the
        caller is to wait (none done; with wait_for_all, not all done), `event` is set once one of the others
        finishes, or when nothing is left to run."""
        done = [i for i in ids if self.engine.is_done(i)]
        work = self.engine.has_work()
        if work and len(done) < len(ids) and (wait_for_all or not done):
            finished = set(done)
            self._waiters.append(({i for i in ids if i not in finished}, event))
        return done, work

    def _wake_waiters(self, finished: set[int] | None) -> None:
        """Sets the events of the waiters with a request in `finished` (all of them when None)."""
        if not self._waiters:
            return
        keep = []
        for ids, event in self._waiters:
            if finished is None or not ids.isdisjoint(finished):
                event.set()
            else:
                keep.append((ids, event))
        self._waiters = keep

    def _publish(self, deltas: Iterable[Delta]) -> None:
        """Hands each streamed request its step's delta; completes the finished ones. Only the requests the
        step touched are visited."""
        for d in deltas:
            handle = self._handles.get(d.request_id)
            if handle is None:
                continue  # a program's request: its program reads it
            self.stats.generated_tokens += len(d.token_ids)
            handle._push(d)
            if d.finished:
                del self._handles[d.request_id]
                self._finished_at.pop(d.request_id, None)
                out = self.engine.output(d.request_id)
                self.engine.forget(d.request_id)
                handle._finish(out, None)

    def _abort(self, handle: RequestHandle, error: BaseException) -> None:
        rid = handle.request_id
        if rid is not None and self._handles.pop(rid, None) is not None:
            self.engine.forget(rid)
        handle._finish(None, error)

    def _expire(self) -> None:
        now = time.monotonic()
        for handle in list(self._handles.values()):
            if handle.deadline is not None and now > handle.deadline:
                self.stats.expired += 1
                self._abort(handle, DeadlineExceeded(f"request {handle.request_id} passed its deadline"))

    def _fail_all(self, error: BaseException) -> None:
        """A step raised: every streamed request fails with the error and is freed, and every program fails
        at its next engine call with its requests freed, so that a step that keeps raising cannot spin."""
        for handle in list(self._handles.values()):
            self._abort(handle, error)
        for state in list(self._program_states.values()):
            state.error = error
            _release(self.engine, list(state.ids))
        self._wake_waiters(None)
        with self._stepped:
            self._stepped.notify_all()

    def wait_step(self, after: int, timeout: float | None = None) -> int:
        """Blocks until the loop has run a step past `after` (or found nothing to step); returns the count."""
        with self._stepped:
            self._stepped.wait_for(lambda: self.stats.steps > after or self._stop, timeout)
            return self.stats.steps

    @property
    def steps(self) -> int:
        return self.stats.steps

    def close(self, timeout: float = 10.0) -> None:
        """Stops the loop; requests still in flight fail with Cancelled and are freed."""
        if self._stop:
            return

        def shutdown() -> None:
            for handle in list(self._handles.values()):
                self._abort(handle, Cancelled("the engine loop closed"))
            self._stop = True

        self._post(shutdown)
        self._thread.join(timeout)
        self._stop = True
        self._workers.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "EngineLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class LoopStats:
    submitted: int = 0
    rejected: int = 0
    expired: int = 0
    steps: int = 0
    step_seconds: float = 0.0
    generated_tokens: int = 0


class ProgramHandle(Future):
    """The future of a program's result; `cancel()` also stops the program at its next engine call and frees
    every KV block its requests hold."""

    def __init__(self, loop: EngineLoop, program: _Program, inner: Future):
        super().__init__()
        self._loop = loop
        self._program = program
        self._inner = inner
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
        self._program.cancelled = True
        ids = list(self._program.ids)
        self._loop._post(lambda: _release(self._loop.engine, ids))
        wake = self._program.wake
        if wake is not None:
            wake.set()
        with self._loop._stepped:
            self._loop._stepped.notify_all()
        return True

    def __await__(self):
        return asyncio.wrap_future(self).__await__()


def _release(engine: Engine, ids: Iterable[int]) -> None:
    for rid in ids:
        if engine.has_request(rid) and not engine.is_done(rid):
            engine.release(rid)


class SharedEngine:
    """An Engine-shaped view of an EngineLoop for a program on a worker thread: the attributes the
    algorithms read (tokenizer, config, max_model_len, reflection_groups) are the engine's own, immutable
    after construction; every method runs on the loop thread. `run` waits while the loop steps all users'
    requests together."""

    def __init__(self, loop: EngineLoop, state: _Program):
        self._loop = loop
        self._state = state
        engine = loop.engine
        self.tokenizer = engine.tokenizer
        self.config = engine.config
        self.max_model_len = engine.max_model_len
        self.reflection_groups = engine.reflection_groups

    def _check(self) -> None:
        if self._state.error is not None:
            raise RuntimeError(f"a model step failed: {self._state.error}") from self._state.error
        if self._state.cancelled:
            raise Cancelled("the query was cancelled")
        if self._state.deadline is not None and time.monotonic() > self._state.deadline:
            self._state.cancelled = True
            raise DeadlineExceeded("the query passed its deadline")

    def _do(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._loop.call(fn, *args, **kwargs).result()

    def add_request(self, prompt, params: SamplingParams | None = None, keep_cache: bool = False) -> int:
        self._check()
        rid = self._do(self._loop.engine.add_request, prompt, params, keep_cache=keep_cache)
        self._state.ids.add(rid)
        return rid

    def fork(self, parent: int, suffixes, params, prefix_len: int | None = None, keep_cache: bool = False
             ) -> list[int]:
        self._check()
        kids = self._do(self._loop.engine.fork, parent, suffixes, params, prefix_len=prefix_len,
                        keep_cache=keep_cache)
        self._state.ids.update(kids)
        return kids

    def release(self, request_id: int) -> None:
        # Not waited for: the loop runs operations in order, so every later call sees it done.
        self._loop._post(lambda: _release(self._loop.engine, [request_id]))

    def forget(self, request_id: int) -> None:
        self._state.ids.discard(request_id)
        self._loop._post(lambda: _forget_all(self._loop.engine, [request_id], self._loop))

    def is_done(self, request_id: int) -> bool:
        return self._do(self._loop.engine.is_done, request_id)

    def output(self, request_id: int) -> RequestOutput:
        return self._do(self._loop.engine.output, request_id)

    def has_work(self) -> bool:
        return self._do(self._loop.engine.has_work)

    def score(self, token_ids) -> torch.Tensor:
        self._check()
        return self._do(self._loop.engine.score, token_ids)

    def step(self) -> list[int]:
        """Waits for the loop's next step (the loop, not the program, steps); returns nothing finished:
        a program re-reads its requests' state after it."""
        self._check()
        self._loop.wait_step(self._loop.steps, timeout=1.0)
        return []

    def _wait(self, ids: list[int], wait_for_all: bool) -> tuple[list[int], bool]:
        """(the listed requests done, whether the engine has work), read between two steps. When none is
        done (with wait_for_all: not all), waits until another finishes, woken by the loop rather than by
        every step, or a second passes, so that cancellation and the deadline are checked."""
        event = threading.Event()
        self._state.wake = event
        try:
            done, work = self._do(self._loop._watch, ids, event, wait_for_all)
            if work and len(done) < len(ids) and (wait_for_all or not done):
                event.wait(1.0)
            return done, work
        finally:
            self._state.wake = None

    def run_until_any(self, request_ids: Iterable[int]) -> list[int]:
        """As Engine.run_until_any: the listed requests done when called, in list order; else, once some
        finish, those in the order they finished."""
        ids = list(request_ids)
        loop = self._loop
        if not ids:
            return []
        waited = False
        while True:
            self._check()
            done, work = self._wait(ids, wait_for_all=False)
            if done:
                if not waited:
                    return done
                order = self._do(lambda: {i: loop._finished_at.get(i, (0, 0)) for i in done})
                return sorted(done, key=lambda i: order[i])
            if not work:
                raise SchedulingError(f"requests {ids} cannot make progress: nothing is scheduled")
            waited = True

    def run(self, request_ids: Iterable[int], progress: bool = False) -> list[RequestOutput]:
        ids = list(request_ids)
        while True:
            self._check()
            done, work = self._wait(ids, wait_for_all=True)
            if len(done) == len(ids):
                return self._do(lambda: [self._loop.engine.output(i) for i in ids])
            if not work:
                raise SchedulingError(f"requests {ids} cannot make progress: nothing is scheduled")

    def _release_all(self) -> None:
        """At the program's end (normal or not), every request it still holds is forgotten."""
        ids = list(self._state.ids)
        self._state.ids.clear()
        if ids:
            try:
                self._do(_forget_all, self._loop.engine, ids, self._loop)
            except Cancelled:
                pass  # the loop is closed: nothing holds the blocks any more


def _forget_all(engine: Engine, ids: Iterable[int], loop: "EngineLoop | None" = None) -> None:
    for rid in ids:
        if loop is not None:
            loop._finished_at.pop(rid, None)
        if engine.has_request(rid):
            engine.forget(rid)
