"""``Cron`` and ``Period``: when the platform runs a job by itself.

``@operator(schedule=Cron("0 2 * * *", timezone="Europe/Berlin"))`` or ``Period(minutes=15)``;
``Jobs(j).schedule(...)`` sets one for a deployed job. Cron expressions are parsed by croniter
(never here) and times are computed in the schedule's IANA time zone, so daylight saving time
behaves as cron's does. Both carry what happens to fires missed while the platform was down
(``catchup``) and to a fire that comes while the previous run still runs (``overlap``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from .errors import ValidationError

CATCHUP = ("last", "none", "all")  # missed fires: run once, skip them, run each (at most MAX_CATCHUP)
OVERLAP = ("skip", "allow", "queue")  # a fire while the previous run is open: drop it, run anyway, run after
MAX_CATCHUP = 100
MIN_PERIOD = 1.0  # seconds
MAX_PERIOD = 100 * 366 * 86400.0  # a century: past it a time is not a number a client can read back


def _policies(catchup: str, overlap: str) -> None:
    if catchup not in CATCHUP:
        raise ValidationError(f"catchup must be one of {CATCHUP}, got {catchup!r}")
    if overlap not in OVERLAP:
        raise ValidationError(f"overlap must be one of {OVERLAP}, got {overlap!r}")


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ValidationError(f"unknown time zone {name!r}: use an IANA name such as 'UTC' or 'Europe/Berlin'") from None


@dataclass(frozen=True)
class Cron:
    """A cron expression (5 fields, or croniter's 6 with seconds) in ``timezone``."""

    expression: str
    timezone: str = "UTC"
    catchup: str = "last"
    overlap: str = "skip"

    def __post_init__(self):
        if not isinstance(self.expression, str) or not croniter.is_valid(self.expression):
            raise ValidationError(f"invalid cron expression {self.expression!r} (expected 'minute hour day month "
                                  "weekday', e.g. '0 2 * * *')")
        zone(self.timezone)
        _policies(self.catchup, self.overlap)
        try:
            self.next_after(dt.datetime.now(dt.timezone.utc).timestamp())
        except CroniterError:
            raise ValidationError(f"cron expression {self.expression!r} never fires (no such date)") from None

    def next_after(self, when: float) -> float:
        """The first fire time after ``when`` (epoch seconds). A wall-clock time repeated when clocks go back
        fires once, as cron's fixed-time jobs do, unless the hour field is a wildcard (then it is another hour)."""
        tz = zone(self.timezone)
        start = dt.datetime.fromtimestamp(when, tz)
        it = croniter(self.expression, start)
        fire = it.get_next(dt.datetime)
        previous = croniter(self.expression, fire).get_prev(dt.datetime)
        hourly = self.expression.split()[1].startswith("*")
        while not hourly and previous.utcoffset() != fire.utcoffset() \
                and previous.replace(tzinfo=None) == fire.replace(tzinfo=None):
            fire = it.get_next(dt.datetime)  # the same wall-clock time again, after the clocks went back
            previous = croniter(self.expression, fire).get_prev(dt.datetime)
        return fire.timestamp()

    def to_dict(self) -> dict:
        return {"cron": self.expression, "timezone": self.timezone, "catchup": self.catchup, "overlap": self.overlap}


@dataclass(frozen=True)
class Period:
    """Every ``days + hours + minutes + seconds``, counted from when the schedule was set."""

    days: float = 0
    hours: float = 0
    minutes: float = 0
    seconds: float = 0
    catchup: str = "last"
    overlap: str = "skip"

    def __post_init__(self):
        for name in ("days", "hours", "minutes", "seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_PERIOD:
                raise ValidationError(f"Period {name}: expected a number >= 0, got {value!r}")
        if not MIN_PERIOD <= self.interval <= MAX_PERIOD:
            raise ValidationError(f"a Period must be at least {MIN_PERIOD:g} second and at most {MAX_PERIOD:g}, "
                                  f"got {self.interval:g}")
        _policies(self.catchup, self.overlap)

    @property
    def interval(self) -> float:
        return ((self.days * 24 + self.hours) * 60 + self.minutes) * 60 + self.seconds

    def next_after(self, when: float, anchor: float) -> float:
        """The first fire after ``when`` of the series ``anchor + k * interval``."""
        steps = max(0, int((when - anchor) // self.interval) + 1)
        return anchor + steps * self.interval

    def to_dict(self) -> dict:
        return {"every": self.interval, "catchup": self.catchup, "overlap": self.overlap}


Schedule = Cron | Period


def from_dict(data) -> Schedule:
    """A schedule from its API form: {"cron", "timezone"} or {"every": seconds}, with catchup and overlap."""
    if isinstance(data, (Cron, Period)):
        return data
    if not isinstance(data, dict):
        raise ValidationError(f"schedule: expected an object, got {type(data).__name__}")
    policy = {k: data[k] for k in ("catchup", "overlap") if k in data}
    if "cron" in data and "every" not in data:
        unknown = set(data) - {"cron", "timezone", "catchup", "overlap"}
        if not unknown:
            return Cron(data["cron"], data.get("timezone", "UTC"), **policy)
    elif "every" in data and "cron" not in data:
        unknown = set(data) - {"every", "catchup", "overlap"}
        if not unknown:
            return Period(seconds=data["every"], **policy)
    else:
        unknown = set()
    raise ValidationError("schedule: expected {cron, timezone?} or {every: seconds}, with catchup? and overlap?"
                          + (f"; unknown field(s) {sorted(unknown)}" if unknown else ""))
