"""Runs, their payloads (arguments, results) and their logs, in SQLite.

The call path goes through ``create``, ``get``, ``start``, ``args``, ``finish`` and ``result``:
each is the same few statements as before the records layer, with rows read as tuples and
turned into a ``RunRecord`` by position.
"""

from __future__ import annotations

from ..base import NewRun, RunRecord
from .connection import Database

COLUMNS = ("id, workspace, job_id, version, status, trigger, created_at, started_at, finished_at, exit_reason, "
           "error_type, attempt, max_retries, timeout, batch_id, batch_index, done_seq, worker, log_bytes, expired_at")
SELECT = f"SELECT {COLUMNS} FROM runs"
INSERT = ("INSERT OR IGNORE INTO runs(id, workspace, job_id, version, trigger, created_at, max_retries, timeout, "
          "batch_id, batch_index, status) VALUES (?,?,?,?,?,?,?,?,?,?,'queued')")
OPEN_SQL = "status IN ('queued', 'running')"  # base.OPEN, as literals: so the partial index runs_open applies
INSERT_ARGS = "INSERT OR IGNORE INTO payloads(run_id, kind, data) VALUES (?, 'args', ?)"


class SqliteRuns:
    def __init__(self, database: Database):
        self.db = database.db
        self.tx = database.tx

    def get(self, run_id: str) -> RunRecord | None:
        row = self.db.execute(f"{SELECT} WHERE id = ?", (run_id,)).fetchone()
        return RunRecord(*row) if row is not None else None

    def _payload(self, run_id: str, kind: str) -> bytes | None:
        row = self.db.execute("SELECT data FROM payloads WHERE run_id = ? AND kind = ?", (run_id, kind)).fetchone()
        return row[0] if row else None

    def args(self, run_id: str) -> bytes | None:
        return self._payload(run_id, "args")

    def result(self, run_id: str) -> bytes | None:
        return self._payload(run_id, "result")

    def create(self, run: NewRun, args: bytes) -> None:
        with self.tx() as db:
            db.execute(INSERT, run)
            db.execute(INSERT_ARGS, (run.id, args))

    def start(self, run_id: str, worker: str, at: float) -> bool:
        cur = self.db.execute(
            "UPDATE runs SET status = 'running', started_at = ?, worker = ? WHERE id = ? AND status = 'queued'",
            (at, worker, run_id))
        return cur.rowcount == 1

    def retry(self, run_id: str, reason: str) -> None:
        self.db.execute("UPDATE runs SET status = 'queued', attempt = attempt + 1, exit_reason = ?, started_at = NULL, "
                        "worker = NULL WHERE id = ?", (reason, run_id))

    def requeue(self, run_id: str, reason: str) -> None:
        self.db.execute("UPDATE runs SET status = 'queued', exit_reason = ?, started_at = NULL, worker = NULL "
                        "WHERE id = ? AND status IN ('queued', 'running')", (reason, run_id))

    def finish(self, run_id: str, status: str, at: float, reason: str | None, error_type: str | None,
               result: bytes, batch_id: str | None) -> bool:
        complete = False
        with self.tx() as db:
            db.execute(
                "UPDATE runs SET status = ?, finished_at = ?, exit_reason = COALESCE(?, exit_reason), error_type = ?, "
                "started_at = COALESCE(started_at, ?) WHERE id = ?",
                (status, at, reason, error_type, at, run_id))
            db.execute("INSERT OR REPLACE INTO payloads(run_id, kind, data) VALUES (?, 'result', ?)", (run_id, result))
            if batch_id:
                seq, total = db.execute("UPDATE batches SET done = done + 1 WHERE id = ? RETURNING done, total",
                                        (batch_id,)).fetchone()
                db.execute("UPDATE runs SET done_seq = ? WHERE id = ?", (seq, run_id))
                complete = total is not None and seq >= total
        return complete

    def append_log(self, run_id: str, data: bytes, limit: int, marker: bytes, dropped: bool) -> bool:
        row = self.db.execute("SELECT log_bytes, (SELECT COALESCE(MAX(seq), -1) + 1 FROM logs WHERE run_id = ?) "
                              "FROM runs WHERE id = ?", (run_id, run_id)).fetchone()
        if row is None:
            return False
        size, seq = row[0] + len(data), row[1]
        with self.tx() as db:
            if size > limit:
                for old_seq, old_len in db.execute(
                        "SELECT seq, length(data) FROM logs WHERE run_id = ? AND seq >= 0 ORDER BY seq",
                        (run_id,)).fetchall():
                    if size <= limit:
                        break
                    db.execute("DELETE FROM logs WHERE run_id = ? AND seq = ?", (run_id, old_seq))
                    size -= old_len
                dropped = True
            if dropped:
                db.execute("INSERT OR REPLACE INTO logs(run_id, seq, data) VALUES (?, -1, ?)", (run_id, marker))
            db.execute("INSERT INTO logs(run_id, seq, data) VALUES (?, ?, ?)", (run_id, seq, data))
            db.execute("UPDATE runs SET log_bytes = ? WHERE id = ?", (size, run_id))
        return True

    def logs_after(self, run_id: str, after_seq: int) -> list[tuple[int, bytes]]:
        return self.db.execute("SELECT seq, data FROM logs WHERE run_id = ? AND seq > ? ORDER BY seq",
                               (run_id, after_seq)).fetchall()

    def of_job(self, job_id: str, status: str | None, before: str | None, limit: int) -> list[RunRecord]:
        sql, params = f"{SELECT} WHERE job_id = ?", [job_id]
        if status:
            sql += " AND status = ?"
            params.append(status)
        if before:
            sql += " AND id < ?"
            params.append(before)
        params.append(limit)
        return [RunRecord(*r) for r in self.db.execute(sql + " ORDER BY id DESC LIMIT ?", params)]

    def open_counts(self, workspace: str) -> dict[str, int]:
        return dict(self.db.execute(f"SELECT status, COUNT(*) FROM runs WHERE workspace = ? AND {OPEN_SQL} "
                                    "GROUP BY status", (workspace,)).fetchall())

    def requeue_running(self, reason: str) -> None:
        self.db.execute("UPDATE runs SET status = 'queued', started_at = NULL, worker = NULL, exit_reason = ? "
                        "WHERE status = 'running'", (reason,))

    def queued(self) -> list[RunRecord]:
        return [RunRecord(*r) for r in self.db.execute(f"{SELECT} WHERE status = 'queued' ORDER BY id")]

    # -- retention ---------------------------------------------------------------------------
    def expire(self, default_days: float, now: float, limit: int) -> tuple[int, int]:
        rows = self.db.execute(
            "SELECT r.id FROM runs r JOIN versions v ON v.job_id = r.job_id AND v.version = r.version "
            "WHERE r.finished_at IS NOT NULL AND r.expired_at IS NULL AND r.finished_at < "
            "? - 86400.0 * COALESCE(json_extract(v.resource, '$.retention_days'), ?) LIMIT ?",
            (now, default_days, limit)).fetchall()
        ids = [(r[0],) for r in rows]
        if not ids:
            return 0, 0
        with self.tx() as db:
            freed = sum(db.execute("SELECT COALESCE(SUM(length(data)), 0) FROM payloads WHERE run_id = ?", i).fetchone()[0]
                        + db.execute("SELECT COALESCE(SUM(length(data)), 0) FROM logs WHERE run_id = ?", i).fetchone()[0]
                        for i in ids)
            db.executemany("DELETE FROM payloads WHERE run_id = ?", ids)
            db.executemany("DELETE FROM logs WHERE run_id = ?", ids)
            db.executemany("UPDATE runs SET expired_at = ?, log_bytes = 0 WHERE id = ?", [(now, i) for (i,) in ids])
        return len(ids), freed

    def delete_finished(self, days: float, now: float, limit: int) -> int:
        ids = [(r[0],) for r in self.db.execute(
            "SELECT id FROM runs WHERE finished_at IS NOT NULL AND finished_at < ? LIMIT ?",
            (now - 86400.0 * days, limit))]
        if ids:
            with self.tx() as db:
                for table in ("payloads", "logs"):
                    db.executemany(f"DELETE FROM {table} WHERE run_id = ?", ids)
                db.executemany("DELETE FROM runs WHERE id = ?", ids)
        return len(ids)
