"""One thread that owns an engine's stepping, so that many users share each model step.

The loop's thread is the only one that touches the engine. Everything else talks to it in messages:
- `submit(prompt, params)` from any thread or coroutine returns a `RequestHandle` (engine/handles.py) at
  once; each step's `Delta` of the request is pushed to it as soon as the step is done.
- `run_program(program)` runs `program(view)` on a worker thread, where `view` is a `ProgramView`
  (engine/program.py): an `EngineClient` whose operations are one-way messages and whose waits are woken by
  the loop when the program's requests finish. So the rows of all users' requests, branches and tree nodes
  meet in the same model steps.
- `call(fn, ...)` runs fn on the loop's thread between two steps and returns a future (for reads such as
  cache statistics).

Each pass of the loop carries out the messages that came in, steps the engine once if it has work, and hands
the step's deltas to the requests' handles and the finished requests' outputs to their programs; with
nothing to do it sleeps until a message arrives (or a request's deadline). Only the requests a step touched
are visited.

Build the engine on the loop's thread (`EngineLoop(lambda: Engine.from_pretrained(...))`) when nothing else in
the process computes with torch: on the CPU, torch's OpenMP runtime (libgomp) keeps a team of worker threads
for every thread that ran a parallel operator, and once the process holds more of them than it has cores it
stops spinning between operators, so every operator of every step sleeps and wakes its workers. An engine
loaded on the main thread leaves such a team behind; built on the loop's thread, the loop's team is the only
one.

Limits: at most `max_pending` requests and programs admitted at once (`QueueFullError` beyond), a per-request
deadline (the request is aborted and its handle fails with `DeadlineExceeded`), and cancellation, which frees
every KV block of the request, or of a program's requests, at the next step.
"""
from __future__ import annotations

import heapq
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TypeVar

from selfrag_engine.engine.handles import Delta, RequestHandle
from selfrag_engine.engine.llm_engine import Engine
from selfrag_engine.engine.program import ProgramHandle, ProgramState, ProgramView, release_all
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.errors import Cancelled, DeadlineExceeded, QueueFullError, RequestError

T = TypeVar("T")

__all__ = ["Delta", "EngineLoop", "LoopStats", "ProgramHandle", "ProgramView", "RequestHandle"]


@dataclass
class LoopStats:
    submitted: int = 0
    rejected: int = 0
    expired: int = 0
    steps: int = 0
    step_seconds: float = 0.0
    generated_tokens: int = 0


def _deadline(timeout_s: float | None) -> float | None:
    """The monotonic time a request or program must end by. A timeout longer than the longest timed wait the
    platform takes (threading.TIMEOUT_MAX, ~292 years; a client's `timeout` of 1e300) is no deadline: every wait
    on it stays a valid timed wait."""
    if timeout_s is None or timeout_s >= threading.TIMEOUT_MAX:
        return None
    return time.monotonic() + timeout_s


class EngineLoop:
    """Owns `engine` from a background thread. `submit` / `run_program` / `call` from any thread.

    engine: an `Engine`, or a function without arguments that builds one, called on the loop's thread (see the
    module docstring: the loop's thread then holds the process's only OpenMP team); the constructor returns
    once it is built, and raises what building it raised.
    max_pending: requests (via submit) plus programs (via run_program) admitted at once.
    program_workers: threads that run programs; a program waiting on the loop holds one.
    """

    def __init__(self, engine: Engine | Callable[[], Engine], *, max_pending: int = 256,
                 program_workers: int = 64):
        if max_pending < 1:
            raise RequestError(f"max_pending must be at least 1, got {max_pending}")
        build = engine if callable(engine) else None  # an Engine is not callable
        self.engine: Engine = None if build is not None else engine  # type: ignore[assignment]
        self.max_pending = max_pending
        self._ops: list[Callable[[], None]] = []
        self._ops_lock = threading.Lock()
        self._wake = threading.Event()
        self._stepped = threading.Condition()
        # Loop thread only: the streamed requests' handles and the programs' requests, by request id.
        self._handles: dict[int, RequestHandle] = {}
        self._owners: dict[int, ProgramState] = {}
        self._deadlines: list[tuple[float, int, RequestHandle]] = []  # a heap, loop thread only
        self._programs: set[ProgramState] = set()  # running programs (added and removed under _ops_lock)
        self._pending = 0  # admitted requests and programs not yet finished
        self._pending_lock = threading.Lock()
        self._stop = False
        self._error: BaseException | None = None
        self._workers = ThreadPoolExecutor(max_workers=program_workers, thread_name_prefix="selfrag-program")
        self.stats = LoopStats()
        built: Future[None] = Future()
        self._thread = threading.Thread(target=self._main, args=(build, built), name="selfrag-engine-loop",
                                        daemon=True)
        self._thread.start()
        try:
            built.result()
        except BaseException:
            self._stop = True  # an interrupt while building: the loop ends once the engine is built
            if built.done():
                self._thread.join()
            self._workers.shutdown(wait=False)
            raise

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
        handle = RequestHandle(self._cancel_request, _deadline(timeout_s))
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
            if handle.deadline is not None:
                heapq.heappush(self._deadlines, (handle.deadline, rid, handle))
            self.stats.submitted += 1

        self._post(add)
        return handle

    def _cancel_request(self, handle: RequestHandle) -> None:
        try:
            self._post(lambda: self._abort(handle, Cancelled("request cancelled")))
        except Cancelled:
            pass  # the loop is closed: it answered every handle as it closed

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Runs fn(*args, **kwargs) on the loop thread between two steps."""
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

    def run_program(self, program: Callable[[ProgramView], T], *, timeout_s: float | None = None
                    ) -> ProgramHandle:
        """Runs program(view) on a worker thread; its engine operations are carried out by the loop."""
        self._check_running()
        self._admit()
        state = ProgramState(_deadline(timeout_s))
        view = ProgramView(self.engine, self._post, state, self._owners)
        with self._ops_lock:
            self._programs.add(state)

        def body() -> T:
            try:
                return program(view)
            finally:
                view.release_everything()
                with self._ops_lock:
                    self._programs.discard(state)
                self._release_slot()

        def free(ids: list[int]) -> None:
            try:
                self._post(lambda: release_all(self.engine, ids))
            except Cancelled:
                pass

        return ProgramHandle(state, self._workers.submit(body), free)

    # -- the loop --------------------------------------------------------------------------------------------

    def _post(self, op: Callable[[], None]) -> None:
        with self._ops_lock:
            self._check_running()
            self._ops.append(op)
        self._wake.set()

    def _check_running(self) -> None:
        if self._stop:
            raise Cancelled("the engine loop is closed")
        if self._error is not None:
            raise RuntimeError(f"the engine loop failed: {self._error!r}") from self._error

    def _main(self, build: Callable[[], Engine] | None, built: Future[None]) -> None:
        if build is not None:
            try:
                engine = build()
                self.engine = engine
            except BaseException as e:  # noqa: BLE001 - raised by the constructor
                self._stop = True
                built.set_exception(e)
                return
        built.set_result(None)
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 - later calls learn of it
            self._error = e
            raise
        finally:
            # Operations that came in while the loop stopped still get their answer, so no caller waits on a
            # future nobody will complete; every program learns that the loop is gone.
            with self._ops_lock:
                self._stop = True
                ops, self._ops = self._ops, []
                programs = list(self._programs)
            for op in ops:
                op()
            for state in programs:
                state.fail(Cancelled("the engine loop closed"))
            with self._stepped:
                self._stepped.notify_all()

    def _run_ops(self) -> None:
        self._wake.clear()
        with self._ops_lock:
            ops, self._ops = self._ops, []
        for op in ops:
            op()

    def _serve(self) -> None:
        while not self._stop:
            self._run_ops()
            if self._stop:
                break
            self._expire()
            if self.engine.has_work():
                self._step()
            elif not self._idle():
                continue
            else:
                self._wake.wait(self._next_deadline())

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            deltas = self.engine.step_deltas()
        except Exception as e:  # noqa: BLE001 - every waiter learns of it; the loop goes on
            self._fail_all(e)
            deltas = []
        self.stats.step_seconds += time.perf_counter() - t0
        self._publish(deltas)
        with self._stepped:
            self.stats.steps += 1
            self._stepped.notify_all()

    def _idle(self) -> bool:
        """Nothing to step. If no message is waiting either, a program still waiting for a request can never
        see it finish: it is told so (SchedulingError). Returns whether the loop may sleep."""
        with self._ops_lock:
            if self._ops:
                return False
            for state in self._programs:
                with state.cond:
                    if state.waiting:
                        state.stalled = True
                        state.cond.notify_all()
        with self._stepped:
            self._stepped.notify_all()
        return True

    def _next_deadline(self) -> float | None:
        return None if not self._deadlines else max(0.0, self._deadlines[0][0] - time.monotonic())

    def _publish(self, deltas: Iterable[Delta]) -> None:
        """Hands each streamed request its step's delta and completes the finished ones; gives each program the
        outputs of its requests that finished. Only the requests the step touched are visited."""
        for d in deltas:
            rid = d.request_id
            handle = self._handles.get(rid)
            if handle is not None:
                self.stats.generated_tokens += len(d.token_ids)
                handle._push(d)
                if d.finished:
                    del self._handles[rid]
                    out = self.engine.output(rid)
                    self.engine.forget(rid)
                    handle._finish(out, None)
            elif d.finished and rid in self._owners:
                state = self._owners[rid]
                engine = self.engine
                state.deliver(rid, engine.scored_logits(rid) if engine.is_scored(rid) else engine.output(rid))

    def _abort(self, handle: RequestHandle, error: BaseException) -> None:
        rid = handle.request_id
        if rid is not None and self._handles.pop(rid, None) is not None:
            self.engine.forget(rid)
        handle._finish(None, error)

    def _expire(self) -> None:
        """Aborts the requests past their deadline: the heap's top, not every handle."""
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] < now:
            _, rid, handle = heapq.heappop(self._deadlines)
            if self._handles.get(rid) is handle:
                self.stats.expired += 1
                self._abort(handle, DeadlineExceeded(f"request {rid} passed its deadline"))

    def _fail_all(self, error: BaseException) -> None:
        """A step raised: every streamed request fails with the error and is freed, and every program fails
        where it waits, its requests freed, so that a step that keeps raising cannot spin."""
        for handle in list(self._handles.values()):
            self._abort(handle, error)
        with self._ops_lock:
            programs = list(self._programs)
        for state in programs:
            with state.cond:
                ids = list(state.ids)
            release_all(self.engine, ids)
            failed = RuntimeError(f"a model step failed: {error}")
            failed.__cause__ = error
            state.fail(failed)

    def wait_step(self, after: int, timeout: float | None = None) -> int:
        """Blocks until the loop has run a step past `after` (or found nothing to step); returns the count."""
        with self._stepped:
            self._stepped.wait_for(lambda: self.stats.steps > after or self._stop, timeout)
            return self.stats.steps

    @property
    def steps(self) -> int:
        return self.stats.steps

    def close(self, timeout: float = 10.0) -> None:
        """Stops the loop; requests still in flight fail with Cancelled and are freed, and programs still
        running fail with Cancelled where they wait or at their next engine call."""
        if self._stop:
            return

        def shutdown() -> None:
            for handle in list(self._handles.values()):
                self._abort(handle, Cancelled("the engine loop closed"))
            self._stop = True

        try:
            self._post(shutdown)
        except Cancelled:
            return
        self._thread.join(timeout)
        self._workers.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "EngineLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
