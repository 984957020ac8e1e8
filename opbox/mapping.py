"""``map`` and ``starmap`` shared by remote functions and remote methods (no heavy imports:
the runtime imports the serving module, which uses this)."""

from __future__ import annotations

import sys
from typing import Iterable


class Mappable:
    """``map`` and ``starmap`` for a remote callable, on top of its ``imap`` (which says the rules)."""

    def map(self, items: Iterable, *, concurrency: int | None = None, return_exceptions: bool = False,
            progress: bool | None = None, kwargs: dict | None = None) -> list:
        """``[f(item) for item in items]``, run remotely; results in input order (see ``imap``)."""
        return list(self.imap(items, concurrency=concurrency, return_exceptions=return_exceptions,
                              progress=progress, kwargs=kwargs))

    def starmap(self, items: Iterable[tuple], **options) -> list:
        """Like ``map``, with each item a tuple of positional arguments."""
        return list(self.imap(items, star=True, **options))


def progress_bar(progress: bool | None, total: int | None, unit: str):
    """A tqdm bar on stderr when asked for (``None``: when stderr is a terminal), else None."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit=unit, desc="map", file=sys.stderr)
