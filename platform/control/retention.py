"""Storage that shrinks: finished runs' payloads and logs expire, old run records go, and code
archives, code folders and environments that no version uses are collected.

A run's arguments, result and log are kept for its job's ``retention_days`` (else the platform's
``OPBOX_RETENTION_DAYS``); then they are dropped and the run is marked expired, so the API says
410 Gone instead of 404. The run's record itself stays for ``OPBOX_RETENTION_RUN_DAYS``. Work is
done in batches, yielding to the event loop between them, so calls are not held up. The platform
runs it every ``OPBOX_GC_INTERVAL`` seconds; ``opbox gc`` runs it now.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from opbox.builder.outputs import collect_outputs

from ..records.base import Dropped, Records
from ..settings import Settings

BATCH = 1000
_ARCHIVE = re.compile(r"[a-z0-9-]+/code/[0-9a-f]{64}\.zip")
_PAYLOAD = re.compile(r"[a-z0-9-]+/payloads/[0-9a-f]{32}")
_FILE = re.compile(r"[a-z0-9-]+/files/[0-9a-f]{64}")


@dataclass
class Collected:
    runs_expired: int = 0
    payload_bytes: int = 0
    runs_deleted: int = 0
    payload_objects_deleted: int = 0
    uploads_expired: int = 0
    files_deleted: int = 0
    archives_deleted: int = 0
    archive_bytes: int = 0
    folders_deleted: int = 0
    folder_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class Retention:
    def __init__(self, records: Records, store, settings: Settings):
        self.records, self.store, self.settings = records, store, settings

    async def collect(self, now: float | None = None) -> Collected:
        now = time.time() if now is None else now
        done = Collected()
        runs = self.records.runs
        done.runs_expired, expired_bytes = await self._drop_all(
            lambda: runs.expire(self.settings.retention_days, now, BATCH))
        done.runs_deleted, deleted_bytes = await self._drop_all(
            lambda: runs.delete_finished(self.settings.retention_run_days, now, BATCH))
        done.payload_bytes = expired_bytes + deleted_bytes
        older_than = now - self.settings.gc_min_age
        done.uploads_expired = await self._expire_uploads(max(older_than, 0.0))
        stored = await asyncio.to_thread(lambda: list(self.store.list("")))
        payloads = [key for key in stored if _PAYLOAD.fullmatch(key)]
        referenced = self.records.runs.stored_keys(payloads)  # the records are read on the loop, never a thread
        done.payload_objects_deleted, orphans = await asyncio.to_thread(
            self._delete_old, [key for key in payloads if key not in referenced], older_than)
        done.payload_bytes += orphans
        files = [key for key in stored if _FILE.fullmatch(key)]  # opbox.File contents: by age (runs name them
        done.files_deleted, file_bytes = await asyncio.to_thread(  # inside their pickles, which are not read)
            self._delete_old, files, now - 86400.0 * self.settings.retention_days)
        done.payload_bytes += file_bytes
        in_use, artifacts = self.records.jobs.in_use()
        archives = [key for key in stored if _ARCHIVE.fullmatch(key)]
        done.archives_deleted, done.archive_bytes = await asyncio.to_thread(
            self._delete_old, [key for key in archives if key not in in_use], older_than)
        done.folders_deleted, done.folder_bytes = await asyncio.to_thread(
            collect_outputs, self.settings.home, artifacts, older_than)
        return done

    async def _drop_all(self, drop: Callable[[], Dropped]) -> tuple[int, int]:
        """Call ``drop`` batch by batch until it finds no more, deleting the stored payloads it releases;
        yields to the event loop between batches. Returns (runs, bytes)."""
        runs = size = 0
        while True:
            dropped = drop()
            runs, size = runs + dropped.runs, size + dropped.bytes
            await asyncio.to_thread(self._delete, dropped.object_keys)
            if dropped.runs < BATCH:
                return runs, size

    async def _expire_uploads(self, before: float) -> int:
        """Payloads uploaded with a signed URL but never attached to a run, asked for before ``before``."""
        count = 0
        while keys := self.records.uploads.expire(before, BATCH):
            await asyncio.to_thread(self._delete, keys)
            count += len(keys)
        return count

    def _delete(self, keys: list[str]) -> None:
        for key in keys:
            self.store.delete(key)

    def _delete_old(self, keys: list[str], older_than: float) -> tuple[int, int]:
        """Delete the objects among ``keys`` last written before ``older_than`` (younger ones may be on their way
        to being used: an upload before its deploy, a payload before its run's record). Returns (objects, bytes).
        Used for code archives no version was made from (a deploy that never came, a failed upload) and for
        payloads no run refers to (a request that failed after its body was stored, a result for a run that
        had already ended)."""
        removed = freed = 0
        for key in keys:
            modified = self.store.modified(key)
            if modified is None or modified >= older_than:
                continue
            freed += self.store.size(key) or 0
            self.store.delete(key)
            removed += 1
        return removed, freed
