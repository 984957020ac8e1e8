"""Schedules: the platform runs a job by itself, on a cron expression or every period.

One schedule per job. Its next fire time is durable (``records.schedules``): the gateway's loop
sleeps until the soonest one, starts the runs that are due (``trigger="schedule"``, with the
schedule's id) and writes the next time before it sleeps again. Fires missed while the platform
was down follow the schedule's ``catchup`` ("last": run once; "none": skip them; "all": run each,
at most ``MAX_CATCHUP``); a fire while the previous run is still open follows ``overlap`` ("skip";
"allow"; "queue": run once it has ended). On Kubernetes the gateway stays the scheduler: its runs
are durable records like any other, and a CronJob would need a pod to create them anyway.

``tick(now)`` is the whole decision, given the time: the clock is a seam (``clock``), so tests
step time instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Callable

from opbox import envelope
from opbox.errors import NotFound, OpboxError
from opbox.schedules import MAX_CATCHUP, Cron, Schedule, from_dict

from ..ids import new_id
from ..records.base import TERMINAL, JobRecord, Records, ScheduleRecord
from .deploys import Deploys
from .runs import Runs

log = logging.getLogger("opbox.schedules")

QUEUE_POLL = 1.0  # seconds: how often a queued fire looks whether the previous run has ended
MAX_SLEEP = 60.0  # the loop looks again at least this often (a clock that jumped, a missed wake-up)
SHARED_POLL = 1.0  # several gateways on one database: changes made on the others are seen this soon


def next_fire(spec: Schedule, after: float, anchor: float) -> float:
    return spec.next_after(after) if isinstance(spec, Cron) else spec.next_after(after, anchor)


class Schedules:
    def __init__(self, records: Records, runs: Runs, deploys: Deploys, clock: Callable[[], float] = time.time):
        self.records = records
        self.runs = runs
        self.deploys = deploys
        self.clock = clock
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # -- the API -------------------------------------------------------------------
    def set(self, workspace: str, job: JobRecord, spec: Schedule | dict) -> ScheduleRecord:
        """Create or replace the job's schedule; a Period counts from now."""
        spec = from_dict(spec)
        now = self.clock()
        record = self.records.schedules.put(ScheduleRecord(
            new_id("s"), workspace, job.id, spec.to_dict(), now, next_fire(spec, now, now), False, False, None, None,
            None, now, now))
        self._wake()
        return record

    def get(self, workspace: str, job: JobRecord) -> ScheduleRecord:
        row = self.records.schedules.get(workspace, job.id)
        if row is None:
            raise NotFound(f"job {job.name} has no schedule")
        return row

    def list(self, workspace: str) -> list[ScheduleRecord]:
        return self.records.schedules.in_workspace(workspace)

    def delete(self, workspace: str, job: JobRecord) -> None:
        if not self.records.schedules.delete(workspace, job.id):
            raise NotFound(f"job {job.name} has no schedule")

    def pause(self, workspace: str, job: JobRecord, paused: bool) -> ScheduleRecord:
        """Pause, or resume: from the next fire after now (fires while paused are not caught up)."""
        row = self.get(workspace, job)
        now = self.clock()
        self.records.schedules.set_paused(row.id, paused, next_fire(from_dict(row.spec), now, row.anchor), now)
        self._wake()
        return self.get(workspace, job)

    # -- firing --------------------------------------------------------------------
    def tick(self, now: float, starting: bool = False) -> float:
        """Start the runs due at ``now``; returns when to look again. ``starting``: the first look after the
        platform started, when every due fire was missed while it was down."""
        wake = now + MAX_SLEEP
        for row in self.records.schedules.active():
            spec = from_dict(row.spec)
            if row.pending and not self._open(row.last_run_id):
                self._fire(row, 1, row.next_fire_at, now)
                row = self.records.schedules.get(row.workspace, row.job_id)
            if row.next_fire_at <= now:
                due = self._due(spec, row, now)
                count = 1 if len(due) == 1 and not starting else \
                    {"last": 1, "none": 0, "all": min(len(due), MAX_CATCHUP)}[spec.catchup]
                self._fire(row, count, next_fire(spec, now, row.anchor), now)
                row = self.records.schedules.get(row.workspace, row.job_id)
            wake = min(wake, row.next_fire_at, now + QUEUE_POLL if row.pending else wake)
        return wake

    @staticmethod
    def _due(spec: Schedule, row: ScheduleRecord, now: float) -> list[float]:
        """The fire times from the recorded next one up to ``now`` (at most MAX_CATCHUP + 1 of them)."""
        due, when = [], row.next_fire_at
        while when <= now and len(due) <= MAX_CATCHUP:
            due.append(when)
            when = next_fire(spec, when, row.anchor)
        return due

    def _open(self, run_id: str | None) -> bool:
        run = self.runs.find(run_id) if run_id else None
        return run is not None and run.status not in TERMINAL

    def _fire(self, row: ScheduleRecord, count: int, next_at: float, now: float) -> None:
        """Start ``count`` runs as the schedule's overlap allows, and record the next fire time. The first run
        is written with the fire, only if the schedule is still as ``row`` read it: a fire happens once, even
        when the leader dies in its middle and the next one looks again (the rest of a catch-up follow it)."""
        overlap = row.spec.get("overlap", "skip")
        pending, run_id, error = False, None, row.last_error
        if count and self._open(row.last_run_id) and overlap != "allow":
            pending, count = overlap == "queue", 0
        seen = row
        for n in range(count):
            def fire(run, args):
                return self.records.schedules.fired(seen, next_at, pending, now, run.id, None, (run, args))

            try:
                _, version = self.deploys.resolve(row.workspace, row.job_id)
                run_id = self.runs.create(version, envelope.json_args(), "schedule", schedule_id=row.id,
                                          write=fire if n == 0 else None)
                error = None
            except OpboxError as exc:  # no ready version, a deleted secret, a quota: said on the schedule
                error = f"{type(exc).__name__}: {exc.message}"
                log.warning("schedule %s of job %s could not start a run: %s", row.id, row.job_id, error)
                break
            if run_id is None:
                return  # the schedule changed since it was read: another gateway fired it
            if n == 0:
                seen = replace(row, next_fire_at=next_at, pending=pending)
        if count == 1 and run_id is not None:
            return  # recorded with its run
        self.records.schedules.fired(seen, next_at, pending, now if run_id else None, run_id, error)

    # -- the loop ------------------------------------------------------------------
    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def start(self, leads: Callable[[], bool] = lambda: True, shared: bool = False) -> None:
        """``leads``: whether this gateway fires schedules now (several gateways on one database: the one
        that leads); ``shared``: other gateways change schedules too, so look again every SHARED_POLL."""
        self._changed = asyncio.Event()
        self._task = asyncio.ensure_future(self._loop(leads, SHARED_POLL if shared else MAX_SLEEP))

    async def _loop(self, leads: Callable[[], bool], max_sleep: float) -> None:
        starting = True
        while True:
            self._changed.clear()
            if not leads():  # another gateway fires; a lead taken over later is no restart: no catch-up
                starting = False
                wake = self.clock() + SHARED_POLL
            else:
                try:
                    wake = self.tick(self.clock(), starting)
                except Exception:  # the state file is busy or full: look again soon
                    log.exception("firing schedules failed")
                    wake = self.clock() + QUEUE_POLL
                starting = False
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, min(wake - self.clock(), max_sleep)))
            except asyncio.TimeoutError:
                pass

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
