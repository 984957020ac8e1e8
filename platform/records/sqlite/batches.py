"""Maps (batches of runs) in SQLite: their counters, their items and their results stream."""

from __future__ import annotations

from typing import Sequence

from ..base import BatchRecord, BatchResult, NewRun, Payload, payload_size
from .connection import Database, storage_errors
from .runs import ADD_USAGE, INSERT_PAYLOAD, OPEN_SQL, as_payload, payload_row

COLUMNS = "id, workspace, job_id, version, concurrency, total, submitted, done, cancelled, created_at"
INSERT_ITEM = ("INSERT INTO runs(id, workspace, job_id, version, trigger, created_at, max_retries, timeout, "
               "batch_id, batch_index, schedule_id, traceparent, parent_span_id, parent_run_id, status) "
               "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,'queued')")


def _record(row: tuple) -> BatchRecord:
    return BatchRecord(*row[:8], bool(row[8]), row[9])


@storage_errors
class SqliteBatches:
    def __init__(self, database: Database):
        self.db = database.db
        self.tx = database.tx
        self.path = database.path

    def create(self, batch_id: str, workspace: str, job_id: str, version: int, concurrency: int | None,
               at: float) -> None:
        self.db.execute(
            "INSERT INTO batches(id, workspace, job_id, version, concurrency, created_at) VALUES (?,?,?,?,?,?)",
            (batch_id, workspace, job_id, version, concurrency, at))

    def get(self, batch_id: str) -> BatchRecord | None:
        row = self.db.execute(f"SELECT {COLUMNS} FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return None if row is None else _record(row)

    def in_workspace(self, workspace: str, before_id: str | None, limit: int) -> list[BatchRecord]:
        return [_record(r) for r in self.db.execute(
            f"SELECT {COLUMNS} FROM batches WHERE workspace = ? AND id < ? ORDER BY id DESC LIMIT ?",
            (workspace, before_id or "\uffff", limit))]

    def status_counts(self, batch_id: str) -> dict[str, int]:
        return dict(self.db.execute("SELECT status, COUNT(*) FROM runs WHERE batch_id = ? GROUP BY status",
                                    (batch_id,)).fetchall())

    def add_items(self, batch_id: str, runs: Sequence[NewRun], args: Sequence[Payload]) -> None:
        with self.tx() as db:
            db.executemany(INSERT_ITEM, runs)
            db.executemany(INSERT_PAYLOAD, [payload_row(run.id, "args", data) for run, data in zip(runs, args)])
            db.execute("UPDATE batches SET submitted = submitted + ? WHERE id = ?", (len(runs), batch_id))
            if runs:
                db.execute(ADD_USAGE, (runs[0].workspace, sum(map(payload_size, args))))

    def indexes(self, batch_id: str, first: int, last: int) -> set[int]:
        return {r[0] for r in self.db.execute(
            "SELECT batch_index FROM runs WHERE batch_id = ? AND batch_index BETWEEN ? AND ?", (batch_id, first, last))}

    def seal(self, batch_id: str, total: int) -> None:
        self.db.execute("UPDATE batches SET total = ? WHERE id = ?", (total, batch_id))

    def cancel(self, batch_id: str) -> None:
        self.db.execute("UPDATE batches SET cancelled = 1 WHERE id = ?", (batch_id,))

    def open_runs(self, batch_id: str) -> list[str]:
        return [r[0] for r in self.db.execute(f"SELECT id FROM runs WHERE batch_id = ? AND {OPEN_SQL}", (batch_id,))]

    def results_after(self, batch_id: str, after: int, limit: int) -> list[BatchResult]:
        return [BatchResult(run_id, index, status, seq, reason, None if data is None else as_payload(data, key, size))
                for run_id, index, status, seq, reason, data, key, size in self.db.execute(
            "SELECT r.id, r.batch_index, r.status, r.done_seq, r.exit_reason, p.data, p.object_key, p.size FROM runs r "
            "LEFT JOIN payloads p ON p.run_id = r.id AND p.kind = 'result' "
            "WHERE r.batch_id = ? AND r.done_seq > ? ORDER BY r.done_seq LIMIT ?", (batch_id, after, limit))]
