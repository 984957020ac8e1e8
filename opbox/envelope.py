"""The payload envelope's framing: what the platform may read (never the pickled body).

How arguments, results and errors travel between SDK and runtime:

    b"OPBX" | format (1 byte) | header length (4 bytes, big-endian) | JSON header | body

The header is plain JSON that the gateway may read (kind, versions, a JSON rendering of
a result, an error's type and message). The body is cloudpickle (or JSON for calls made by
non-Python clients) and is only ever decoded by the SDK and the runtime, never the gateway.
"""

from __future__ import annotations

import json
import struct
import sys

from .errors import SerializationError, ValidationError

MAGIC = b"OPBX"
FORMAT = 1
CONTENT_TYPE = "application/x-opbox-envelope"
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
JSON_INLINE_LIMIT = 64 * 1024  # a result's JSON rendering goes in the header up to this size
_PREFIX = struct.Struct(">4sBI")

ARGS, RESULT, ERROR = "args", "result", "error"


def pack(header: dict, body: bytes = b"") -> bytes:
    raw = json.dumps(header, separators=(",", ":"), default=str).encode()
    return _PREFIX.pack(MAGIC, FORMAT, len(raw)) + raw + body


class Pieces:
    """An envelope as the buffers it is made of, in order: its head, the pickle stream, then the pickle's
    out-of-band buffers (numpy and pandas data, pickle protocol 5). Sent piece by piece, a large value's
    data goes from its own memory to the socket, never copied into one bytes object first; ``bytes(p)``
    joins them where one buffer is wanted (a payload small enough to travel inline)."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: list):
        """``parts``: ``bytes`` and one-dimensional byte views (``PickleBuffer.raw()``), whose ``len`` is their size."""
        self.parts = parts
        self.size = sum(map(len, parts))

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def __iter__(self):
        return iter(self.parts)


def pack_pieces(header: dict, body: list, buffers=()) -> Pieces:
    """``pack``, as pieces: the head, the body's pieces and ``buffers`` (whose sizes the header's ``oob`` lists)."""
    raw = json.dumps(header, separators=(",", ":"), default=str).encode()
    return Pieces([_PREFIX.pack(MAGIC, FORMAT, len(raw)) + raw, *body, *buffers])


def unpack(data: bytes) -> tuple[dict, memoryview]:
    """Split an envelope into its header and (undecoded) body."""
    if len(data) < _PREFIX.size:
        raise SerializationError("payload is not an opbox envelope (too short)")
    magic, fmt, size = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise SerializationError("payload is not an opbox envelope (bad magic)")
    if fmt != FORMAT:
        raise SerializationError(f"envelope format {fmt} is not supported (this side speaks {FORMAT})")
    end = _PREFIX.size + size
    if end > len(data):
        raise SerializationError("envelope header is truncated")
    try:
        header = json.loads(bytes(data[_PREFIX.size:end]))
    except ValueError as exc:
        raise SerializationError(f"envelope header is not JSON: {exc}") from None
    if not isinstance(header, dict) or "kind" not in header:
        raise SerializationError("envelope header lacks its kind")
    return header, memoryview(data)[end:]


def read_header(data: bytes) -> dict:
    return unpack(data)[0]


def head_length(prefix: bytes) -> int:
    """How many bytes an envelope's head (prefix and JSON header) takes, from its first ``PREFIX_SIZE`` bytes."""
    if len(prefix) < _PREFIX.size:
        raise SerializationError("payload is not an opbox envelope (too short)")
    magic, _, size = _PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise SerializationError("payload is not an opbox envelope (bad magic)")
    return _PREFIX.size + size


PREFIX_SIZE = _PREFIX.size


REF_MAGIC = b"OPBR"  # a reference to a payload uploaded to the object store: REF_MAGIC + its key (UTF-8)
URL_HEADER = "X-Opbox-Payload-Url"  # an answer whose payload is fetched from this (signed) URL, not its body
ACCEPT_URL_HEADER = "X-Opbox-Accept-Url"  # a request saying the client fetches a stored payload by URL itself


def ref(key: str) -> bytes:
    """The body that stands for a payload uploaded to the object store under ``key``."""
    return REF_MAGIC + key.encode()


def ref_key(data: bytes) -> str | None:
    """The object key a reference body names; None when ``data`` is not a reference."""
    if not data.startswith(REF_MAGIC):
        return None
    try:
        return bytes(data[len(REF_MAGIC):]).decode()
    except UnicodeDecodeError:
        raise SerializationError("a payload reference's key is not UTF-8") from None


def json_args(args: list | None = None, kwargs: dict | None = None) -> bytes:
    """An args envelope for calls made with JSON (curl, non-Python clients)."""
    if args is not None and not isinstance(args, list):
        raise ValidationError("'args' must be a JSON array")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValidationError("'kwargs' must be a JSON object")
    body = json.dumps({"args": args or [], "kwargs": kwargs or {}}).encode()
    return pack({"kind": ARGS, "fmt": "json"}, body)


def error_envelope(type_name: str, message: str, traceback_text: str = "") -> bytes:
    """An error made without pickling (by the runtime for its own failures, or by the platform)."""
    return pack({"kind": ERROR, "type": type_name, "message": message, "traceback": traceback_text})
