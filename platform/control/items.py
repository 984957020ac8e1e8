"""A streaming run's items: what its generator yielded, kept as it was yielded, read back from any point.

The runtime sends item N (numbered from 1) while the run is running; it is stored (inline, or in the
object store when large) with its bytes counted in the workspace's usage, before the generator goes
on. Readers ask for the items after the last one they saw, so a client that lost its connection
resumes where it was. Items expire with their run (retention). Nothing here decodes them.
"""

from __future__ import annotations

import asyncio

from opbox import envelope
from opbox.errors import Conflict, NotFound, PayloadTooLarge, ValidationError

from ..records.base import TERMINAL, Payload, Records, payload_size
from .payloads import head_of
from .runs import Runs

PAGE = 1000  # items per read


class RunItems:
    def __init__(self, records: Records, runs: Runs):
        self.records, self.runs = records, runs
        self.notifier = runs.notifier

    def add(self, run_id: str, seq: int, item: Payload) -> None:
        """Keep item ``seq`` of a running run; one already kept (a resend, a retry's repeat) is left as it was."""
        run = self.runs.find(run_id)
        if run is None:
            raise NotFound(f"no run {run_id}")
        if run.status != "running":
            raise Conflict(f"run {run_id} is {run.status}: it takes no more items")
        if seq < 1:
            raise ValidationError(f"items are numbered from 1, got {seq}")
        size = payload_size(item)
        if size > self.runs.limits.max_payload:
            raise PayloadTooLarge(f"item {seq} is {size} bytes; the limit is {self.runs.limits.max_payload}")
        if envelope.read_header(head_of(item))["kind"] != envelope.RESULT:
            raise ValidationError("an item is a result envelope")
        self.runs.check_quota(run.workspace, size)
        if self.records.items.add(run_id, run.workspace, seq, item):
            self.notifier.notify(f"items:{run_id}")

    def after(self, run_id: str, after: int) -> list[tuple[int, Payload]]:
        return self.records.items.after(run_id, after, PAGE)

    def get(self, run_id: str, seq: int) -> Payload:
        item = self.records.items.get(run_id, seq)
        if item is None:
            raise NotFound(f"run {run_id} has no item {seq}")
        return item

    def over(self, workspace: str, run_id: str, after: int) -> str | None:
        """The run's status once a reader that has seen ``after`` items has seen them all (it has ended: the
        runtime sends every item before its result); None while more may come."""
        run = self.runs.get(workspace, run_id)
        if run.status in TERMINAL and after >= self.records.items.count(run_id):
            return run.status
        return None

    async def wait(self, run_id: str, timeout: float) -> bool:
        """Until the run has a new item or ends; False when ``timeout`` passed first."""
        waits = [asyncio.ensure_future(self.notifier.wait(key, timeout)) for key in (f"items:{run_id}", run_id)]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            return any(w.result() for w in done)
        finally:
            for w in waits:
                w.cancel()
