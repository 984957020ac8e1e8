"""``map`` and ``starmap`` shared by remote functions and remote methods (no heavy imports:
the runtime imports the serving module, which uses this)."""

from __future__ import annotations

from typing import AsyncIterator, Iterable

from .twin import twin


class Mappable:
    """``map`` and ``starmap`` for a remote callable, on top of its ``imap`` and ``aimap`` (which say the rules).

    ``await``-able twins: ``async for r in f.map.aio(items)`` and ``f.starmap.aio(items)`` yield the
    results in input order, as they come, without blocking the event loop.
    """

    @twin
    def map(self, items: Iterable, *, concurrency: int | None = None, return_exceptions: bool = False,
            progress: bool | None = None, kwargs: dict | None = None) -> list:
        """``[f(item) for item in items]``, run remotely; results in input order (see ``imap``)."""
        return list(self.imap(items, concurrency=concurrency, return_exceptions=return_exceptions,
                              progress=progress, kwargs=kwargs))

    @map.aio
    def map(self, items, *, concurrency: int | None = None, return_exceptions: bool = False,
            progress: bool | None = None, kwargs: dict | None = None) -> AsyncIterator:
        return self.aimap(items, concurrency=concurrency, return_exceptions=return_exceptions, progress=progress,
                          kwargs=kwargs)

    @twin
    def starmap(self, items: Iterable[tuple], **options) -> list:
        """Like ``map``, with each item a tuple of positional arguments."""
        return list(self.imap(items, star=True, **options))

    @starmap.aio
    def starmap(self, items, **options) -> AsyncIterator:
        return self.aimap(items, star=True, **options)


async def aiter_items(items):
    """An async iterable's items, or a plain iterable's."""
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
