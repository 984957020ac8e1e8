"""A stream that follows rows as they are written (a map's results, a run's items), resumable: NDJSON, or the
frames of ``opbox.result_frames`` for a map's results when the SDK asks for them."""

from __future__ import annotations

import json
from typing import Awaitable, Callable, Iterable

from starlette.responses import StreamingResponse

from .render import SHUTTING_DOWN_LINE

HEARTBEAT = '{"heartbeat": true}\n'


def follow_ndjson(after: int, read: Callable[[int], list], render: Callable[[object], tuple[int, dict]],
                  end: Callable[[int], str | None], wait: Callable[[], Awaitable[bool]],
                  closing: Callable[[], bool]) -> StreamingResponse:
    """Lines for the rows ``read(after)`` gives (``render``: a row's position and line), reading on from the last
    one sent; when none is left, ``end(after)`` is the stream's last text (None: more may come, so it
    ``wait``s, with a heartbeat line every time the wait times out). A gateway that stops ends it with a
    "shutdown" line: the client reconnects from the last position it saw."""

    def lines(rows: list) -> tuple[int, str]:
        out = []
        for row in rows:
            position, line = render(row)
            out.append(json.dumps(line))
        return position, "\n".join(out) + "\n"

    return follow(after, read, lines, end, wait, closing, "application/x-ndjson", HEARTBEAT, SHUTTING_DOWN_LINE)


def follow(after: int, read: Callable[[int], list], encode: Callable[[list], tuple[int, str | bytes]],
           end: Callable[[int], str | bytes | None], wait: Callable[[], Awaitable[bool]], closing: Callable[[], bool],
           media_type: str, heartbeat: str | bytes, shutdown: str | bytes) -> StreamingResponse:
    """``follow_ndjson`` for any encoding: ``encode(rows)`` is the position of the last row and their text."""

    async def stream() -> Iterable[str | bytes]:
        position = after
        while True:
            rows = read(position)
            if rows:
                position, data = encode(rows)
                yield data
                continue
            last = end(position)
            if last is not None:
                if last:
                    yield last
                return
            if closing():
                yield shutdown
                return
            if not await wait():
                yield heartbeat

    return StreamingResponse(stream(), media_type=media_type)
