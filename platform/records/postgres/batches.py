"""Maps (batches of runs) in PostgreSQL: their counters, their items and their results stream."""

from __future__ import annotations

from typing import Sequence

from ..base import BatchRecord, BatchResult, NewRun, Payload, payload_size
from .connection import Database, storage_errors
from .runs import ADD_USAGE, OPEN_SQL, RUN_FIELDS, UPSERT_PAYLOAD, as_payload, payload_row

COLUMNS = "id, workspace, job_id, version, concurrency, total, submitted, done, cancelled, created_at"
# a chunk of items in one statement: each column of the runs (and of their arguments) as one array
ADD_ITEMS = f"""
WITH r AS (INSERT INTO runs({RUN_FIELDS}, status, worker)
           SELECT *, 'queued', %(owner)s FROM unnest(%(id)s::text[], %(workspace)s::text[], %(job_id)s::text[], %(version)s::int[],
             %(trigger)s::text[], %(created_at)s::float8[], %(max_retries)s::int[], %(timeout)s::float8[],
             %(batch_id)s::text[], %(batch_index)s::int[], %(schedule_id)s::text[], %(traceparent)s::text[],
             %(parent_span_id)s::text[], %(parent_run_id)s::text[])),
p AS (INSERT INTO payloads(run_id, kind, data, object_key, size)
      SELECT id, 'args', data, key, size FROM unnest(%(id)s::text[], %(data)s::bytea[], %(key)s::text[], %(size)s::bigint[])
        AS a(id, data, key, size) {UPSERT_PAYLOAD}),
b AS (UPDATE batches SET submitted = submitted + %(n)s WHERE id = %(batch)s),
u AS (INSERT INTO usage(workspace, bytes) SELECT %(ws)s, %(bytes)s WHERE %(n)s > 0 {ADD_USAGE})
SELECT 1"""


def _record(row: tuple) -> BatchRecord:
    return BatchRecord(*row[:8], bool(row[8]), row[9])


@storage_errors
class PostgresBatches:
    def __init__(self, database: Database, gateway: str):
        self.db = database
        self.where = database.where
        self.owner = f"{gateway}/"  # the gateway whose queue holds the items it adds (see runs.INSERT_RUN)

    def create(self, batch_id: str, workspace: str, job_id: str, version: int, concurrency: int | None,
               at: float) -> None:
        self.db.run("INSERT INTO batches(id, workspace, job_id, version, concurrency, created_at) "
                    "VALUES (%s,%s,%s,%s,%s,%s)", (batch_id, workspace, job_id, version, concurrency, at))

    def get(self, batch_id: str) -> BatchRecord | None:
        row = self.db.one(f"SELECT {COLUMNS} FROM batches WHERE id = %s", (batch_id,))
        return None if row is None else _record(row)

    def in_workspace(self, workspace: str, before_id: str | None, limit: int) -> list[BatchRecord]:
        return [_record(r) for r in self.db.all(
            f"SELECT {COLUMNS} FROM batches WHERE workspace = %s AND id < %s ORDER BY id DESC LIMIT %s",
            (workspace, before_id or "\uffff", limit))]

    def status_counts(self, batch_id: str) -> dict[str, int]:
        return dict(self.db.all("SELECT status, COUNT(*) FROM runs WHERE batch_id = %s GROUP BY status", (batch_id,)))

    def add_items(self, batch_id: str, runs: Sequence[NewRun], args: Sequence[Payload]) -> None:
        columns = {name: [getattr(run, name) for run in runs] for name in NewRun._fields}
        data, keys, sizes = zip(*map(payload_row, args)) if args else ((), (), ())
        self.db.one(ADD_ITEMS, {**columns, "data": list(data), "key": list(keys), "size": list(sizes), "n": len(runs),
                                "batch": batch_id, "owner": self.owner, "ws": runs[0].workspace if runs else "",
                                "bytes": sum(map(payload_size, args))})

    def indexes(self, batch_id: str, first: int, last: int) -> set[int]:
        return {r[0] for r in self.db.all(
            "SELECT batch_index FROM runs WHERE batch_id = %s AND batch_index BETWEEN %s AND %s", (batch_id, first, last))}

    def seal(self, batch_id: str, total: int) -> None:
        self.db.run("UPDATE batches SET total = %s WHERE id = %s", (total, batch_id))

    def cancel(self, batch_id: str) -> None:
        self.db.run("UPDATE batches SET cancelled = 1 WHERE id = %s", (batch_id,))

    def open_runs(self, batch_id: str) -> list[str]:
        return [r[0] for r in self.db.all(f"SELECT id FROM runs WHERE batch_id = %s AND {OPEN_SQL}", (batch_id,))]

    def results_after(self, batch_id: str, after: int, limit: int) -> list[BatchResult]:
        return [BatchResult(run_id, index, status, seq, reason, None if data is None else as_payload(data, key, size))
                for run_id, index, status, seq, reason, data, key, size in self.db.all(
            "SELECT r.id, r.batch_index, r.status, r.done_seq, r.exit_reason, p.data, p.object_key, p.size FROM runs r "
            "LEFT JOIN payloads p ON p.run_id = r.id AND p.kind = 'result' "
            "WHERE r.batch_id = %s AND r.done_seq > %s ORDER BY r.done_seq LIMIT %s", (batch_id, after, limit))]
