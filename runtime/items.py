"""A streaming run's items (``f.remote_gen(...)``): each value its generator yields goes to the gateway,
which stores it, before the generator is asked for the next one."""

from __future__ import annotations

import json

from opbox import serialization
from opbox.errors import OpboxError, PayloadTooLarge, SerializationError, from_response

ENVELOPE = {"Content-Type": serialization.CONTENT_TYPE}


class ItemShipper:
    """Sends items 1, 2, ... of one run to ``path`` over the runtime's channel."""

    def __init__(self, channel, path: str, limit: str | None):
        self.channel, self.path = channel, path
        self.limit = int(limit) if limit and limit.isdigit() else None
        self.count = 0

    def __call__(self, value) -> None:
        seq = self.count + 1
        try:
            payload = serialization.dump_result(value)
        except Exception as exc:
            raise SerializationError(f"item {seq} could not be pickled: {type(exc).__name__}: {exc}") from exc
        if self.limit is not None and len(payload) > self.limit:
            raise PayloadTooLarge(f"item {seq} is {len(payload)} bytes; the platform's limit is {self.limit} bytes "
                                  "(OPBOX_MAX_PAYLOAD): yield less, or write it to storage and yield where")
        status, _, data = self.channel.request("POST", f"{self.path}?seq={seq}", payload, ENVELOPE)
        if status >= 300:
            try:
                body = json.loads(data)
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise OpboxError(f"the platform refused item {seq}: HTTP {status}: {data[:300]!r}")
            raise from_response(status, body)
        self.count = seq
