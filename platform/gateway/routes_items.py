"""Routes for a streaming run's items (a generator function called with ``remote_gen``)."""

from __future__ import annotations

import base64
import json

from starlette.requests import Request

from opbox import envelope
from opbox.errors import ValidationError

from ..records.base import StoredPayload
from .http import payload_response, query_number
from .follow import follow_ndjson
from .routes_jobs import platform, workspace
from .routes_runs import expired


async def stream_items(request: Request):
    """
    summary: Stream a run's items as its generator yields them (NDJSON), from item after+1 on
    description: >
      One line per item, {"seq", "payload" (base64 result envelope)}, in the order they were yielded
      (numbered from 1), each as soon as it is stored; an item kept in the object store (above
      OPBOX_PAYLOAD_INLINE) comes as {"seq", "stored": true, "size"}: read it from GET /runs/{run}/items/{seq}.
      The last line is {"end": true, "status", "items"} once the run has ended and every item was sent
      (read a failed run's error from GET /runs/{run}/result). {"heartbeat": true} every 15 s of quiet;
      {"shutdown": true} when the gateway stops: reconnect with after= the last seq seen.
    parameters:
      - {name: after, in: query, description: the last item seen (0 for all), schema: {type: integer, minimum: 0}}
    responses:
      200: {description: NDJSON stream}
      404: {description: No such run}
      410: {description: The run's items have expired (retention)}
    """
    ws = workspace(request)
    plat = platform(request)
    run_id = request.path_params["run"]
    expired(plat.runs.get(ws, run_id), "items")
    items = plat.items
    after = query_number(request, "after", 0, 0, 10**12, int)

    def render(row) -> tuple[int, dict]:
        seq, item = row
        if isinstance(item, StoredPayload):  # large: read it from its own route
            return seq, {"seq": seq, "stored": True, "size": item.size}
        return seq, {"seq": seq, "payload": base64.b64encode(item).decode()}

    def end(seen: int) -> str | None:
        status = items.over(ws, run_id, seen)
        return None if status is None else json.dumps({"end": True, "status": status, "items": seen}) + "\n"

    return follow_ndjson(after, lambda a: items.after(run_id, a), render, end, lambda: items.wait(run_id, 15.0),
                         lambda: items.notifier.closing)


async def get_item(request: Request):
    """
    summary: One item of a streaming run, as its result envelope (the SDK reads large items here)
    responses:
      200: {description: The item's envelope (application/x-opbox-envelope)}
      404: {description: No such run or item}
      410: {description: The run's items have expired (retention)}
    """
    ws = workspace(request)
    plat = platform(request)
    run_id = request.path_params["run"]
    expired(plat.runs.get(ws, run_id), "items")
    seq = request.path_params["seq"]
    if not seq.isdigit():
        raise ValidationError(f"an item number is a whole number, got {seq!r}")
    item = plat.items.get(run_id, int(seq))
    by_url = isinstance(item, StoredPayload) and envelope.ACCEPT_URL_HEADER in request.headers  # the SDK fetches it
    return await payload_response(plat.payloads, item, by_url=by_url)
