"""Small request/response helpers shared by the gateway's routes."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from opbox import envelope
from opbox.errors import BadRequest, OpboxError, PayloadTooLarge, StorageError, StorageFull, ValidationError

from ..control.payloads import Payloads, too_large
from ..records.base import Payload, StoredPayload


async def read_body(request: Request, limit: int) -> bytes:
    return await _collect(request.headers.get("content-length"), request.stream(), limit)


async def _collect(declared: str | None, chunks, limit: int) -> bytes:
    _check_declared(declared, limit)
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _check_declared(declared: str | None, limit: int) -> None:
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None


async def read_payload(request: Request, payloads: Payloads, workspace: str, limit: int,
                       what: str = "payload") -> Payload:
    """An envelope from the request body: bytes when small (read at once, the hot path), else spooled
    to disk as it arrives and kept in the object store, never whole in memory."""
    return await _payload(request.headers.get("content-length"), request.stream, payloads, workspace, limit, what)


async def receive_payload(declared: str | None, receive, payloads: Payloads, workspace: str, limit: int,
                          what: str = "payload") -> Payload:
    """``read_payload`` for a pure ASGI handler (``declared``: its Content-Length header): the same limits and
    answers, without a ``Request``."""
    return await _payload(declared, lambda: receive_chunks(receive), payloads, workspace, limit, what)


async def _payload(declared: str | None, stream, payloads: Payloads, workspace: str, limit: int,
                   what: str) -> Payload:
    if declared is not None and declared.isdigit() and int(declared) <= payloads.inline:
        body = await _collect(declared, stream(), limit)
        if body.startswith(envelope.REF_MAGIC):  # uploaded to the object store with a signed URL: claim it
            return await payloads.attach(workspace, body, limit, what)
        return body
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(what, int(declared), limit)
    spool = payloads.spool(workspace, limit, what)
    try:
        async for chunk in stream():
            spool.write(chunk)
        return await spool.finish()
    finally:
        spool.close()


async def receive_chunks(receive):
    """The request body's chunks straight from ASGI ``receive`` (``Request.stream`` without the ``Request``);
    ClientDisconnect when the client leaves before its end."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        body = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return


def query_values(query_string: bytes) -> dict[str, str]:
    """A query string's parameters, the last value of each, as starlette's ``QueryParams`` reads them
    (``parse_qsl`` with blank values kept); a string with nothing escaped is split without it."""
    if not query_string:
        return {}
    text = query_string.decode("latin-1")
    if "%" in text or "+" in text:
        return dict(parse_qsl(text, keep_blank_values=True))
    values = {}
    for field in text.split("&"):
        if field:
            name, _, value = field.partition("=")
            values[name] = value
    return values


async def payload_response(payloads: Payloads, payload: Payload | None, headers: dict | None = None,
                           by_url: bool = False, internal: bool = False) -> Response:
    """An envelope as the answer's body: streamed from the object store when it lives there, or, ``by_url``,
    an empty answer whose header says where to fetch it (``internal``: for a runtime)."""
    if isinstance(payload, StoredPayload):
        if by_url:
            url = payloads.download_url(payload, internal)
            return Response(b"", media_type=envelope.CONTENT_TYPE,
                            headers={**(headers or {}), envelope.URL_HEADER: url, "X-Opbox-Payload-Size": str(payload.size)})
        body = await payloads.reader(payload)
        return StreamingResponse(body, media_type=envelope.CONTENT_TYPE,
                                 headers={**(headers or {}), "Content-Length": str(payload.size)})
    return Response(payload or b"", media_type=envelope.CONTENT_TYPE, headers=headers)


async def json_body(request: Request, limit: int = 1024 * 1024, required: bool = True) -> dict:
    raw = await read_body(request, limit)
    if not raw.strip():
        if required:
            raise BadRequest("expected a JSON object in the request body")
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # the decoder recurses per level: nesting deeper than Python's stack
        raise BadRequest("request body is JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object in the request body")
    return body


def query_number(request: Request, name: str, default: float | None, low: float, high: float, kind=float):
    """``number`` of a query parameter, read from the raw query string as ``QueryParams`` would read it
    (a worker's next has one: no ``QueryParams`` object made per request)."""
    return number(query_values(request.scope["query_string"]).get(name), name, default, low, high, kind)


def number(raw: str | None, name: str, default: float | None, low: float, high: float, kind=float):
    """A query parameter's number: ``default`` when absent or empty, 422 when not a ``kind`` in [low, high]."""
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValidationError(f"query parameter {name!r} must be a {kind.__name__}, got {raw!r}") from None
    if not low <= value <= high:
        raise ValidationError(f"query parameter {name!r} must be between {low:g} and {high:g}, got {raw!r}")
    return value


def ok(data, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)


def count_error(metrics, exc: OpboxError) -> None:
    """What the metrics count of an error answer: the state file's or the store's failures."""
    if isinstance(exc, StorageError):
        metrics.storage_errors(exc.details.get("component", "store"), "full" if isinstance(exc, StorageFull) else "error").inc()


def error_response(exc: OpboxError) -> JSONResponse:
    """An OpboxError as the API's JSON answer (``to_dict``), with Retry-After on a 429 that knows when;
    the one rendering for the app's exception handler and the service calls' fast path."""
    headers = {}
    if exc.status == 429 and "retry_after" in exc.details:
        headers["Retry-After"] = str(exc.details["retry_after"])
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)
