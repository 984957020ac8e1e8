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
    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self.closing = False
        self.publish: Callable[[str], None] | None = None  # to the other gateways (never blocks)

    def close(self) -> None:
        self.closing = True
        for event in self._events.values():
            event.set()
        self._events.clear()

    def notify(self, key: str) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()
        if self.publish is not None:
            self.publish(key)

    def deliver(self, key: str) -> None:
        """A key another gateway notified: wake the waiters here (on the loop)."""
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    async def wait(self, key: str, timeout: float) -> bool:
        """True when notified, False on timeout. Check the condition *before* calling."""
        if self.closing:
            return False
        event = self._events.get(key)
        if event is None:
            event = self._events[key] = asyncio.Event()
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            if not event.is_set() and self._events.get(key) is event and not event._waiters:  # noqa: SLF001
                self._events.pop(key, None)
