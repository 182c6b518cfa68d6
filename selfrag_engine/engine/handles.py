"""A request submitted to an `EngineLoop`: `RequestHandle`, the consumer's end of its stream of deltas.

The loop's thread pushes each step's `Delta` of the request (engine/output.py) and, at the end, its
`RequestOutput` or its error; any number of threads and coroutines read them: `result()` / `await handle`
for the output, `deltas()` / `async for delta in handle` for the stream, `cancel()` to abort it.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import AsyncIterator, Callable, Iterator

from selfrag_engine.engine.output import Delta, RequestOutput

__all__ = ["Delta", "RequestHandle"]


class RequestHandle:
    """A request submitted to the loop: wait for it (`result`, `await handle`), stream it (`deltas`,
    `async for delta in handle`) or `cancel` it. Thread-safe."""

    def __init__(self, abort: Callable[["RequestHandle"], None], deadline: float | None):
        self._abort = abort  # asks the loop to abort the request (one-way)
        self.request_id: int | None = None
        self.num_prompt_tokens: int | None = None  # once the engine took the request
        self.deadline = deadline
        self.future: Future[RequestOutput] = Future()
        self.accepted: Future[int] = Future()  # the request id once the engine took the request
        self._events: list[Delta] = []
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancelled = False
        self._finished = False  # set once, by the loop, when the request is over (whatever its future says)
        self._on_finish: Callable[[], None] | None = None  # frees the admission slot, before the future is done

    # -- consumer side ----------------------------------------------------------------------------------

    def result(self, timeout: float | None = None) -> RequestOutput:
        return self.future.result(timeout)

    def __await__(self):
        return asyncio.wrap_future(self.future).__await__()

    def cancel(self) -> None:
        """Aborts the request; its blocks are freed at the next step. A finished request stays finished."""
        if not self._finished:
            self.cancelled = True
            self._abort(self)

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
            if self._finished:
                return
            self._finished = True
            if self._on_finish is not None:
                self._on_finish()
            # An asyncio wrapper of the future may have cancelled it (a client that went away): the request is
            # finished all the same, and its slot freed above.
            if not self.future.done():
                if error is not None:
                    self.future.set_exception(error)
                else:
                    self.future.set_result(out)
            self._cond.notify_all()
            waiters = list(self._async_waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)
