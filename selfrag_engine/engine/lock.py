"""The engine's lock: reentrant, and handed over first come, first served.

`Engine.run` steps under the lock and lets go of it between steps; with a plain lock the stepping thread
could take it back at once, every time, and starve a thread waiting to add or fork a request. Here a
thread that lets go while others wait is queued behind them.
"""
from __future__ import annotations

import functools
import threading
from collections import deque
from typing import Callable, TypeVar

T = TypeVar("T")


class FairLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._queue: deque[int] = deque()  # waiting threads, first come first

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            self._queue.append(me)
            try:
                while self._owner is not None or self._queue[0] != me:
                    self._cond.wait()
            except BaseException:
                # An interrupted waiter leaves the queue, so it does not block the ones behind it.
                self._queue.remove(me)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self._owner, self._depth = me, 1

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("the engine lock is released by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def locked(method: Callable[..., T]) -> Callable[..., T]:
    """A method that runs holding its object's `_lock`."""
    @functools.wraps(method)
    def under_lock(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return under_lock
