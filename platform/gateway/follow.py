"""An NDJSON stream that follows rows as they are written (a map's results, a run's items), resumable."""

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

    async def stream() -> Iterable[str]:
        position = after
        while True:
            rows = read(position)
            if rows:
                lines = []
                for row in rows:
                    position, line = render(row)
                    lines.append(json.dumps(line))
                yield "\n".join(lines) + "\n"
                continue
            last = end(position)
            if last is not None:
                if last:
                    yield last
                return
            if closing():
                yield SHUTTING_DOWN_LINE
                return
            if not await wait():
                yield HEARTBEAT

    return StreamingResponse(stream(), media_type="application/x-ndjson")
