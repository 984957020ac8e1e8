"""Read models across jobs: the runs API's search, maps with their progress, a workspace's overview.

Everything here reads the records through the port's indexed queries (``RunRecords.search``,
``hour_counts``, ``BatchRecords.in_workspace``): each is bounded by a limit or a time window, so answers
stay fast however many runs are stored; the overview's settled hours are counted once and kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from opbox.errors import NotFound, ValidationError

from ..ids import id_at
from ..records.base import OPEN, TERMINAL, BatchRecord, Records, RunFilter

STATUSES = (*OPEN, "succeeded", "failed", "cancelled", "timed_out")
MAX_PAGE = 1000


@dataclass(frozen=True)
class Page:
    """One page, newest first, and the cursor of the next (None: this was the last)."""

    items: list
    next: str | None


@dataclass(frozen=True)
class Progress:
    """A map and how many of its items are in each status."""

    batch: BatchRecord
    counts: dict[str, int]

    @property
    def finished(self) -> int:
        return sum(n for status, n in self.counts.items() if status in TERMINAL)


class Views:
    def __init__(self, records: Records):
        self.records = records

    def runs(self, workspace: str, *, job: str | None = None, status: str | None = None,
             trigger: str | None = None, batch: str | None = None, since: float | None = None,
             until: float | None = None, cursor: str | None = None, limit: int = 50, parent: str | None = None) -> Page:
        """Runs across the workspace's jobs, newest first. ``job`` is a job id or name; ``since``/``until``
        are epoch seconds (creation time); ``cursor`` is the previous page's ``next``; ``parent``: the runs
        a run's code started (its children, map items included)."""
        if status is not None and status not in STATUSES:
            raise ValidationError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        if not 1 <= limit <= MAX_PAGE:
            raise ValidationError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        job_id = None
        if job is not None:
            row = self.records.jobs.get(workspace, job)
            if row is None:
                return Page([], None)  # no such job: no runs (a filter, not a lookup)
            job_id = row.id
        before = id_at("r", until) if until is not None else None
        if cursor is not None and (before is None or cursor < before):
            before = cursor
        where = RunFilter(job_id, status, trigger, batch, id_at("r", since) if since is not None else None, before,
                          parent)
        rows = self.records.runs.search(workspace, where, limit + 1)
        return Page(rows[:limit], rows[limit - 1].id if len(rows) > limit else None)

    def batches(self, workspace: str, cursor: str | None = None, limit: int = 50) -> Page:
        """The workspace's maps, newest first (their counters: submitted, done, total; ``batch`` counts
        one map's items by status)."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValidationError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        rows = self.records.batches.in_workspace(workspace, cursor, limit + 1)
        return Page(rows[:limit], rows[limit - 1].id if len(rows) > limit else None)

    def batch(self, workspace: str, batch_id: str) -> Progress:
        """A map with its items counted by status (one walk of its items)."""
        row = self.records.batches.get(batch_id)
        if row is None or row.workspace != workspace:
            raise NotFound(f"no batch {batch_id}")
        return Progress(row, self.records.batches.status_counts(batch_id))

    def overview(self, workspace: str, hours: int = 24, now: float | None = None) -> dict:
        """Runs per status in each of the last ``hours`` hours (oldest first), and the busiest jobs of
        that window with their failures."""
        now = time.time() if now is None else now
        start = (int(now) // 3600 - hours + 1) * 3600
        per_hour = self.records.runs.hour_counts(workspace, [start + 3600 * h for h in range(hours)], now)
        buckets, totals, jobs = [], {}, {}
        for hour, rows in per_hour.items():
            counts: dict[str, int] = {}
            for job_id, status, n in rows:
                counts[status] = counts.get(status, 0) + n
                job = jobs.setdefault(job_id, [0, 0])
                job[0] += n
                job[1] += n if status in ("failed", "timed_out") else 0
            buckets.append({"start": hour, "counts": counts})
            for status, n in counts.items():
                totals[status] = totals.get(status, 0) + n
        names = {j.id: j.name for j in self.records.jobs.in_workspace(workspace)}
        busiest = [{"job_id": job_id, "name": names.get(job_id, job_id), "runs": n, "failed": failed}
                   for job_id, (n, failed) in sorted(jobs.items(), key=lambda item: (-item[1][0], item[0]))[:10]]
        return {"since": start, "hours": buckets, "totals": totals, "busiest_jobs": busiest,
                "open": self.records.runs.open_counts(workspace)}
