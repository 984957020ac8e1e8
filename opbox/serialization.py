"""The pickle side of the envelope: dumping and loading arguments, results and errors.

Only the SDK and the runtime import this module; the platform reads envelopes through
``opbox.envelope`` and never decodes a pickled body (an import-linter contract keeps it so).
"""

from __future__ import annotations

import json

from .envelope import (  # noqa: F401  (re-exported for the SDK and runtime)
    ARGS, CONTENT_TYPE, ERROR, JSON_INLINE_LIMIT, PYTHON, RESULT, Pieces, error_envelope, json_args, pack,
    pack_pieces, read_header, unpack,
)
from .errors import SerializationError
from .libraries import differences, dumps, dumps_out_of_band


def _cloudpickle():
    import cloudpickle

    return cloudpickle


def cloudpickle_version() -> str:
    return _cloudpickle().__version__


def _pickle_header(kind: str, libs: dict | None = None) -> dict:
    header = {"kind": kind, "fmt": "cloudpickle", "python": PYTHON, "cloudpickle": cloudpickle_version()}
    if libs:
        header["libs"] = libs  # versions of the libraries the pickled objects' classes are from
    return header


def dump_args(args: tuple = (), kwargs: dict | None = None, stream: bool = False) -> bytes:
    """An args envelope; ``stream``: the call streams its generator's items (``remote_gen``)."""
    return bytes(_dump_args(args, kwargs, stream, False))


def dump_args_pieces(args: tuple = (), kwargs: dict | None = None, stream: bool = False) -> Pieces:
    """``dump_args`` as pieces, large buffers (numpy, pandas) out of band: to be sent before the values change."""
    return _dump_args(args, kwargs, stream, True)


def _dump_args(args, kwargs, stream: bool, out_of_band: bool) -> Pieces:
    try:
        body, buffers, libs = _dumps((tuple(args), dict(kwargs or {})), out_of_band)
    except Exception as exc:
        raise SerializationError(f"arguments could not be pickled: {type(exc).__name__}: {exc}") from exc
    header = _pickle_header(ARGS, libs)
    if stream:
        header["stream"] = True
    return _pack(header, body, buffers)


def dump_result(value) -> bytes:
    return bytes(dump_result_pieces(value, out_of_band=False))


def dump_result_pieces(value, out_of_band: bool = True) -> Pieces:
    """A result envelope as pieces, large buffers (numpy, pandas) out of band unless told not to."""
    body, buffers, libs = _dumps(value, out_of_band)
    header = _pickle_header(RESULT, libs)
    if not buffers and sum(map(len, body)) <= 2 * JSON_INLINE_LIMIT:  # a larger pickle has no JSON rendering that fits
        try:
            rendered = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            rendered = None
        if rendered is not None and len(rendered) <= JSON_INLINE_LIMIT:
            header["json"] = value
    return _pack(header, body, buffers)


def _dumps(value, out_of_band: bool) -> tuple[list, list, dict]:
    """The pickle stream's pieces, the out-of-band buffers, the libraries' versions."""
    if out_of_band:
        return dumps_out_of_band(value)
    body, libs = dumps(value)
    return [body], [], libs


def _pack(header: dict, stream: list, buffers: list) -> Pieces:
    if buffers:
        header["oob"] = [buffer.nbytes for buffer in buffers]  # the body: the stream, then these buffers
    return pack_pieces(header, stream, buffers)


def describe_exception(exc: BaseException) -> str:
    """``str(exc)``, or a stand-in when the exception's own ``__str__`` raises (the run must still end)."""
    try:
        return str(exc)
    except Exception as inner:
        return f"<{type(exc).__qualname__} whose __str__ raised {type(inner).__name__}>"


def dump_error(exc: BaseException, traceback_text: str) -> bytes:
    try:
        body, libs = dumps(exc)
    except Exception:
        body, libs = b"", None  # the header still names the type, the message and the traceback
    header = _pickle_header(ERROR, libs)
    header.update(type=f"{type(exc).__module__}.{type(exc).__qualname__}", message=describe_exception(exc),
                  traceback=traceback_text,
                  bases=[f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__[1:-2]])  # for Retries(retry_on=)
    return pack(header, body)


def check_compatible(header: dict) -> None:
    """Refuse a pickled body made by another Python minor or cloudpickle major version."""
    if header.get("fmt") != "cloudpickle":
        return
    theirs, ours = header.get("python"), PYTHON
    if theirs != ours:
        raise SerializationError(
            f"Python version mismatch: the payload was pickled by Python {theirs} and this side runs "
            f"Python {ours}; pickled calls cannot cross Python minor versions. Use Python {ours} on the "
            f"client, or deploy to a runtime built for Python {theirs}."
        )
    their_cp, our_cp = str(header.get("cloudpickle", "")), cloudpickle_version()
    if their_cp.split(".")[0] != our_cp.split(".")[0]:
        raise SerializationError(
            f"cloudpickle version mismatch: the payload was made with cloudpickle {their_cp} and this side "
            f"has {our_cp}; pin the same major version on both sides (requirements.txt)."
        )


def load_body(header: dict, body) -> object:
    """Decode an envelope's body (SDK and runtime only)."""
    fmt = header.get("fmt")
    if fmt == "json":
        return json.loads(bytes(body))
    check_compatible(header)
    try:
        if "oob" in header:
            body, buffers = _out_of_band(header, body)
            return _cloudpickle().loads(body, buffers=buffers)
        return _cloudpickle().loads(body)
    except Exception as exc:
        kind = header.get("kind")
        differ = differences(header.get("libs"), pickled_by_caller=kind == ARGS)
        if differ:
            raise SerializationError(
                f"could not unpickle the {kind} payload: library versions differ: {differ}; install the same "
                f"versions on both sides (requirements.txt for the job): {type(exc).__name__}: {exc}",
                libraries=header.get("libs")) from exc
        raise SerializationError(
            f"could not unpickle the {kind} payload (made by Python {header.get('python')}, "
            f"cloudpickle {header.get('cloudpickle')}; this side: Python {PYTHON}, cloudpickle "
            f"{cloudpickle_version()}): {type(exc).__name__}: {exc}"
        ) from exc


def _out_of_band(header: dict, body) -> tuple[memoryview, list]:
    """The pickle stream and its out-of-band buffers (the header's ``oob`` sizes, at the body's end): views of
    ``body``, so arrays are made on the received bytes without a copy; copied when ``body`` is read-only, as
    an unpickled array is writable."""
    view = memoryview(body)
    sizes = header["oob"]
    if not (isinstance(sizes, list) and all(isinstance(n, int) and n >= 0 for n in sizes)) or sum(sizes) > len(view):
        raise SerializationError(f"the envelope's out-of-band sizes {sizes!r} do not fit its {len(view)} bytes")
    start = len(view) - sum(sizes)
    buffers = []
    for size in sizes:
        part = view[start:start + size]
        buffers.append(bytearray(part) if view.readonly else part)
        start += size
    return view[:len(view) - sum(sizes)], buffers


def load_call(data: bytes) -> tuple[tuple, dict, bool]:
    """An args envelope's arguments, and whether the call streams its items."""
    header, body = unpack(data)
    if header["kind"] != ARGS:
        raise SerializationError(f"expected an args envelope, got {header['kind']!r}")
    value = load_body(header, body)
    if header.get("fmt") == "json":
        return tuple(value.get("args") or ()), dict(value.get("kwargs") or {}), False
    args, kwargs = value
    return args, kwargs, header.get("stream", False)


def load_args(data: bytes) -> tuple[tuple, dict]:
    args, kwargs, _ = load_call(data)
    return args, kwargs
