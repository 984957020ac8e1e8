"""Finding the user's function and running one call of it: args envelope in, result envelope out."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import traceback
import types

from opbox import serialization
from opbox.errors import PayloadTooLarge, SerializationError


_CODE_DIRS: list[str] = []  # where user code is imported from: its files show relative to it in tracebacks


def load_target(entry: str, code_dir: str | None = None):
    """Import ``module:qualname`` from the code folder; unwrap an @operator to the user's object."""
    if code_dir and code_dir not in sys.path:
        sys.path.insert(0, code_dir)
    if code_dir:
        _CODE_DIRS.extend({code_dir, os.path.abspath(code_dir)} - set(_CODE_DIRS))
    module_name, _, qualname = entry.partition(":")
    module = importlib.import_module(module_name)
    try:
        import cloudpickle

        cloudpickle.register_pickle_by_value(module)  # user classes in results travel by value
    except Exception:
        pass
    target = module
    for part in qualname.split("."):
        target = getattr(target, part)
    return getattr(target, "__opbox_target__", target)


_HERE = os.path.dirname(os.path.abspath(__file__))
_PLUMBING = (_HERE + os.sep, os.path.join("concurrent", "futures"), os.path.join("asyncio", ""))


def _relative(text: str) -> str:
    """A traceback with the user's files named as in their project (``File "main.py"``), not by server paths."""
    for folder in _CODE_DIRS:
        text = text.replace(f'File "{folder.rstrip(os.sep)}{os.sep}', 'File "')
    return text


def _user_tb(exc: BaseException) -> str:
    """The traceback from the user's first frame on (the runtime's, the thread pool's and asyncio's frames cut)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and any(p in tb.tb_frame.f_code.co_filename for p in _PLUMBING):
        tb = tb.tb_next
    return _relative("".join(traceback.format_exception(type(exc), exc, tb)))


def _user_traceback(exc: BaseException, skip: int) -> str:
    tb = exc.__traceback__
    for _ in range(skip):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    try:
        return _relative("".join(traceback.format_exception(type(exc), exc, tb)))
    except Exception:  # the exception's __str__ raises: the frames, then a line naming it
        return _relative("".join(traceback.format_tb(tb))) + \
            f"{type(exc).__qualname__}: {serialization.describe_exception(exc)}\n"


def within_limit(outcome: str, payload, limit: str | None) -> tuple[str, bytes | serialization.Pieces]:
    """The run's answer, or, when the result passes the platform's limit (``X-Opbox-Result-Limit``), a
    failure that names both sizes: the gateway would refuse the body, and the worker must live on."""
    if limit and limit.isdigit() and len(payload) > int(limit):
        error = PayloadTooLarge(f"the result is {len(payload)} bytes; the platform's limit is {limit} bytes "
                                "(OPBOX_MAX_PAYLOAD): return less, or write it to storage and return where")
        return "failed", serialization.dump_error(error, "")
    return outcome, payload


_DEFERRED = (types.CoroutineType, types.GeneratorType, types.AsyncGeneratorType)


async def collect(values) -> list:
    """An async generator's values, as a list."""
    return [value async for value in values]


async def ship_all(values, ship) -> None:
    """Each of an async generator's values to ``ship``, as it is yielded."""
    async for value in values:
        ship(value)


class Executor:
    """Runs calls of one entry point. ``preload`` imports it ahead of the first run; an import
    error is kept and fails each run with its traceback (the worker does not crash-loop)."""

    def __init__(self, entry: str, code_dir: str | None):
        self.entry, self.code_dir = entry, code_dir
        self.target = None
        self.import_error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # one for the worker's life: user clients bound to it live on

    def settle(self, value):
        """What a call returns: a coroutine awaited, a generator's values as a list (sync or async)."""
        if isinstance(value, types.GeneratorType):
            return list(value)
        if isinstance(value, types.AsyncGeneratorType):
            value = collect(value)
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
        task = self.loop.create_task(value)
        try:
            return self.loop.run_until_complete(task)
        except BaseException:
            if not task.done():  # a cancel (signal) or an interrupt: the coroutine unwinds before the run ends
                task.cancel()
                try:
                    self.loop.run_until_complete(task)
                except BaseException:
                    pass
            raise

    def preload(self) -> None:
        try:
            self.target = load_target(self.entry, self.code_dir)
        except Exception as exc:
            self.import_error = exc

    def stream(self, value, ship) -> int:
        """A streaming call (``remote_gen``): the generator's values shipped as items; the result is their count."""
        if isinstance(value, types.GeneratorType):
            for item in value:
                ship(item)
        elif isinstance(value, types.AsyncGeneratorType):
            self.settle(ship_all(value, ship))
        else:
            raise TypeError(f"remote_gen streams the values of a generator function; {self.entry} returned "
                            f"{type(value).__name__}, not a generator: call it with f(...) instead")
        return ship.count

    def __call__(self, args_payload: bytes, ship=None) -> tuple[str, bytes | serialization.Pieces]:
        """One call; ``ship`` sends a streaming call's items (see ``items.ItemShipper``). A result is the
        envelope's pieces, its large buffers (numpy, pandas) out of band, handed in before the next run."""
        try:
            if self.target is None:
                if self.import_error is not None:
                    exc, self.import_error = self.import_error, None
                    raise exc
                self.target = load_target(self.entry, self.code_dir)
            args, kwargs, streams = serialization.load_call(args_payload)
        except SerializationError as exc:
            return "failed", serialization.dump_error(exc, "")
        except Exception as exc:
            return "failed", serialization.dump_error(exc, _user_traceback(exc, 1))
        try:
            value = self.target(*args, **kwargs)
            if streams and ship is not None:
                value = self.stream(value, ship)
            elif isinstance(value, _DEFERRED):
                value = self.settle(value)
        except Exception as exc:
            return "failed", serialization.dump_error(exc, _user_tb(exc))
        try:
            return "succeeded", serialization.dump_result_pieces(value)
        except Exception as exc:
            error = SerializationError(f"the result could not be pickled: {type(exc).__name__}: {exc}")
            return "failed", serialization.dump_error(error, _user_traceback(exc, 0))
