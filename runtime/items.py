"""A streaming run's items (``f.remote_gen(...)``): each value its generator yields goes to the gateway,
which stores it, before the generator is asked for the next one."""

from __future__ import annotations

import json

from opbox import serialization
from opbox.errors import OpboxError, PayloadTooLarge, SerializationError, from_response

from .transfer import offload

ENVELOPE = {"Content-Type": serialization.CONTENT_TYPE}


class ItemShipper:
    """Sends items 1, 2, ... of one run to ``path`` over the runtime's channel."""

    def __init__(self, channel, path: str, headers, uploads_path: str | None = None):
        """``headers``: the lease's (the result limit, the inline limit); ``uploads_path``: where to ask for a
        signed upload for an item above the inline limit."""
        self.channel, self.path, self.uploads_path = channel, path, uploads_path
        limit, inline = headers.get("X-Opbox-Result-Limit"), headers.get("X-Opbox-Inline")
        self.limit = int(limit) if limit and limit.isdigit() else None
        self.inline = int(inline) if inline and inline.isdigit() else None
        self.count = 0

    def __call__(self, value) -> None:
        seq = self.count + 1
        try:
            payload = serialization.dump_result_pieces(value)  # sent before the generator resumes
        except Exception as exc:
            raise SerializationError(f"item {seq} could not be pickled: {type(exc).__name__}: {exc}") from exc
        if self.limit is not None and len(payload) > self.limit:
            raise PayloadTooLarge(f"item {seq} is {len(payload)} bytes; the platform's limit is {self.limit} bytes "
                                  "(OPBOX_MAX_PAYLOAD): yield less, or write it to storage and yield where")
        if self.inline is not None and self.uploads_path and len(payload) > self.inline:
            payload = offload(self.channel, self.uploads_path, payload)  # its bytes skip the gateway
        else:
            payload = bytes(payload)
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
