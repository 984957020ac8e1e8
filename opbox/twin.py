"""Methods with an awaitable twin: ``handle.submit(x)`` blocks, ``await handle.submit.aio(x)`` does not.

    class RunHandle:
        @twin
        def result(self, timeout=None): ...

        @result.aio
        async def result(self, timeout=None): ...

The bound pair is made once per instance (cached in its ``__dict__``), so later calls cost what a
plain method call costs.
"""

from __future__ import annotations

import functools
from types import MethodType


class twin:
    def __init__(self, sync):
        self.sync = sync
        self.async_fn = None
        self.name = sync.__name__
        functools.update_wrapper(self, sync)

    def aio(self, async_fn) -> "twin":
        """Register the awaitable twin (an ``async def``, or a function returning an async iterator)."""
        self.async_fn = async_fn
        return self

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        bound = Twin(MethodType(self.sync, obj), MethodType(self.async_fn, obj))
        obj.__dict__[self.name] = bound
        return bound


class Twin:
    """A bound method, callable as ever, with its awaitable twin as ``.aio``."""

    __slots__ = ("sync", "aio")

    def __init__(self, sync, aio):
        self.sync, self.aio = sync, aio

    @property
    def __doc__(self) -> str | None:  # help(f.submit) shows the method's docstring
        return self.sync.__doc__

    def __call__(self, *args, **kwargs):
        return self.sync(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.sync.__qualname__} of {self.sync.__self__!r}, awaitable as .aio>"
