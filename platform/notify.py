"""Wake-ups for long-polls and streams: wait on a key until someone calls notify(key).

``close`` (the platform is stopping) wakes every waiter and makes later waits return at once:
long-polls answer with the state as it is and streams end with a "reconnect" signal, so none of
them holds the gateway's shutdown open.

Several gateways on one database: ``publish`` (set by ``core`` from the records' ``wakeups``) sends
each key to the other gateways, whose records call ``deliver`` with it; alone, it is None.
"""

from __future__ import annotations

import asyncio
from typing import Callable


class Notifier:
    """Each waiter is a bare future woken by ``notify`` (or by its timer), not an ``asyncio.Event`` awaited
    through ``wait_for`` (a task per wait): a call's wake-up is one step of the event loop."""

    def __init__(self) -> None:
        self._waiters: dict[str, list[asyncio.Future]] = {}
        self.closing = False
        self.publish: Callable[[str], None] | None = None  # to the other gateways (never blocks)

    def close(self) -> None:
        self.closing = True
        for futures in self._waiters.values():
            _wake(futures, True)
        self._waiters.clear()

    def notify(self, key: str) -> None:
        futures = self._waiters.pop(key, None)
        if futures is not None:
            _wake(futures, True)
        if self.publish is not None:
            self.publish(key)

    def deliver(self, key: str) -> None:
        """A key another gateway notified: wake the waiters here (on the loop)."""
        futures = self._waiters.pop(key, None)
        if futures is not None:
            _wake(futures, True)

    async def wait(self, key: str, timeout: float | None) -> bool:
        """True when notified, False on timeout (None: none). Check the condition *before* calling."""
        if self.closing:
            return False
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        futures = self._waiters.get(key)
        if futures is None:
            self._waiters[key] = [future]
        else:
            futures.append(future)
        timer = None if timeout is None else loop.call_later(timeout, _wake, (future,), False)
        try:
            return await future
        finally:
            if timer is not None:
                timer.cancel()
            futures = self._waiters.get(key)
            if futures is not None and future in futures:  # timed out or cancelled: not notified
                futures.remove(future)
                if not futures:
                    del self._waiters[key]


def _wake(futures, value: bool) -> None:
    for future in futures:
        if not future.done():
            future.set_result(value)
