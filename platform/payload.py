"""A payload as the platform holds it: inline bytes, or one object in the object store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True, slots=True)
class StoredPayload:
    """A payload above the inline limit: its bytes are one object in the object store; the records keep
    its key, its size and its envelope's head (prefix and JSON header: all the platform ever reads)."""

    key: str
    size: int
    head: bytes


Payload = Union[bytes, StoredPayload]  # an args or result envelope, inline or in the object store


def payload_size(payload: Payload) -> int:
    return payload.size if isinstance(payload, StoredPayload) else len(payload)
