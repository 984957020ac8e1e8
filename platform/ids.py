"""Identifiers: time-ordered (so listing by id lists by age) and unguessable."""

from __future__ import annotations

import re
import secrets
import time

from opbox.errors import ValidationError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_WORKSPACE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def new_id(prefix: str) -> str:
    return f"{prefix}-{time.time_ns() // 1_000_000:011x}{secrets.token_hex(5)}"


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValidationError(
            f"{what} {name!r} is not valid: use 1 to 63 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


def check_workspace(name: str) -> str:
    if not isinstance(name, str) or not _WORKSPACE.fullmatch(name):
        raise ValidationError(
            f"workspace {name!r} is not valid: use 1 to 63 lowercase letters, digits or '-', not starting or ending with '-'"
        )
    return name


def id_at(prefix: str, when: float) -> str:
    """The smallest id ``new_id(prefix)`` makes at time ``when``: ids compare as their times do, so a time
    range is a range of ids (the runs API's since/until)."""
    return f"{prefix}-{max(0, int(when * 1000)):011x}"
