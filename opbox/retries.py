"""``Retries``: how a failed Job-Run is tried again: how often, after how long, on which errors.

``Resource(max_retries=N)`` alone retries at once on any failure (as before). ``Retries`` waits
``initial_delay * backoff ** (attempt - 1)`` seconds (at most ``max_delay``) before attempt
``attempt + 1``; the wait is kept by the platform (a restart of the gateway keeps it).
``retry_on`` narrows it to exceptions of those types (classes or names, matched against the
raised exception's class and its bases, as the runtime reports them); a run that timed out is
retried only with ``retry_timeouts=True``. Validated when it is made.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ValidationError

MAX_RETRIES = 100


def type_name(kind: type | str) -> str:
    """``OSError`` -> ``builtins.OSError``; a string stays as it is (``"TimeoutError"``, ``"mylib.Busy"``)."""
    if isinstance(kind, type) and issubclass(kind, BaseException):
        return f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(kind, str) and kind.strip():
        return kind.strip()
    raise ValidationError(f"retry_on: expected exception classes or their names, got {kind!r}")


def _number(value, what: str, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise ValidationError(f"{what}: expected a number >= {low:g}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Retries:
    max_retries: int = 3
    backoff: float = 2.0
    initial_delay: float = 1.0
    max_delay: float = 60.0
    retry_on: tuple[type | str, ...] = ()  # empty: any exception
    retry_timeouts: bool = False

    def __post_init__(self):
        set_ = object.__setattr__
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) \
                or not 0 <= self.max_retries <= MAX_RETRIES:
            raise ValidationError(f"max_retries: expected a whole number from 0 to {MAX_RETRIES}, got {self.max_retries!r}")
        set_(self, "backoff", _number(self.backoff, "backoff", 1.0))
        set_(self, "initial_delay", _number(self.initial_delay, "initial_delay", 0.0))
        set_(self, "max_delay", _number(self.max_delay, "max_delay", self.initial_delay))
        retry_on = (self.retry_on,) if isinstance(self.retry_on, (type, str)) else self.retry_on
        if not isinstance(retry_on, (tuple, list)):
            raise ValidationError(f"retry_on: expected a tuple of exception classes or names, got {self.retry_on!r}")
        set_(self, "retry_on", tuple(type_name(k) for k in retry_on))
        if not isinstance(self.retry_timeouts, bool):
            raise ValidationError(f"retry_timeouts: expected True or False, got {self.retry_timeouts!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after attempt ``attempt`` (0-based) failed, before the next one."""
        return min(self.max_delay, self.initial_delay * self.backoff ** attempt)

    def retries(self, status: str, error_types: list[str]) -> bool:
        """Whether an attempt that ended ``status`` (failed, timed_out) with an exception of ``error_types``
        (the class and its bases; empty when the process died without raising) is worth another."""
        if status == "timed_out":
            return self.retry_timeouts
        if status != "failed":
            return False
        if not self.retry_on:
            return True
        return any(_matches(want, got) for want in self.retry_on for got in error_types)

    def to_dict(self) -> dict:
        return {"max_retries": self.max_retries, "backoff": self.backoff, "initial_delay": self.initial_delay,
                "max_delay": self.max_delay, "retry_on": list(self.retry_on), "retry_timeouts": self.retry_timeouts}

    @classmethod
    def from_dict(cls, data) -> "Retries":
        if not isinstance(data, dict):
            raise ValidationError(f"retries: expected an object, got {type(data).__name__}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValidationError(f"retries: unknown field(s) {sorted(unknown)}")
        return cls(**{k: tuple(v) if k == "retry_on" and isinstance(v, list) else v for k, v in data.items()})


def _matches(want: str, got: str) -> bool:
    """``builtins.OSError`` matches itself; a bare ``TimeoutError`` matches a class of that name in any module."""
    return want == got or ("." not in want and got.rpartition(".")[2] == want)
