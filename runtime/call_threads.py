"""The threads a replica runs the user's sync code in (the constructor, sync methods, sync generators).

``loop.run_in_executor`` on a ``ThreadPoolExecutor`` costs 13–18 µs of CPU a call at 32 concurrent calls
here: a ``concurrent.futures.Future`` with its condition, the executor's locks and idle semaphore, and the
asyncio future chained to it by callbacks. ``CallThreads`` hands the thread the call and the asyncio future
itself, and the thread sets the result through ``call_soon_threadsafe``: 4–5 µs. Semantics are the
executor's: at most ``size`` threads, started only when no thread is idle (so one thread, ``size=1``,
runs everything: the constructor and the methods see the same thread), calls taken in order.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable


class CallThreads:
    def __init__(self, size: int, name: str):
        self.size, self.name = size, name
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.threads = self.idle = 0
        self.closed = False

    def run(self, fn: Callable, *args) -> asyncio.Future:
        """``fn(*args)`` in one of the threads; its value (or exception) as an asyncio future of the running loop."""
        if self.closed:
            raise RuntimeError("the call threads are shut down")
        future = asyncio.get_running_loop().create_future()
        self.calls.put((fn, args, future))
        with self.lock:
            if self.idle:
                self.idle -= 1  # that thread takes it
                return future
            if self.threads >= self.size:
                return future  # it waits for the first thread done with its call
            self.threads += 1
        threading.Thread(target=self._work, name=f"{self.name}_{self.threads - 1}", daemon=True).start()
        return future

    def shutdown(self) -> None:
        """Threads end once done with their calls (as ``ThreadPoolExecutor.shutdown(wait=False)``)."""
        self.closed = True
        for _ in range(self.threads):
            self.calls.put(None)

    def _work(self) -> None:
        while (call := self.calls.get()) is not None:
            fn, args, future = call
            call = None
            try:
                result, exc = fn(*args), None
            except BaseException as error:
                result, exc = None, error
            with self.lock:  # idle before the caller hears: a call it makes next finds this thread
                self.idle += 1
            _settle(future, result, exc)
            fn = args = future = result = exc = None  # the call's objects are not kept alive while idle


def _settle(future: asyncio.Future, result, exc: BaseException | None) -> None:
    try:
        future.get_loop().call_soon_threadsafe(_set, future, result, exc)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass


def _set(future: asyncio.Future, result, exc: BaseException | None) -> None:
    if future.done():  # cancelled: the caller went away
        return
    if isinstance(exc, StopIteration):  # an asyncio future refuses it (it would end the awaiting coroutine)
        error = RuntimeError(f"the call raised StopIteration: {exc}")
        error.__cause__ = exc
        exc = error
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)
