"""Runs, their payloads (arguments, results) and their logs, in SQLite.

The call path goes through ``create``, ``get``, ``start``, ``args``, ``finish`` and ``result``:
each is the same few statements as before the records layer, with rows read as tuples and
turned into a ``RunRecord`` by position.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Sequence

from ...ids import id_at
from ..base import AttemptRecord, Dropped, NewRun, Payload, RunFilter, RunRecord, StoredPayload, payload_size
from .connection import Database, storage_errors

log = logging.getLogger("opbox.records")
SETTLE_AFTER = 120.0  # seconds after an hour's end before it may be kept counted (a run id made then, stored later)


def hour_of(run_id: str) -> int:
    """The start (epoch seconds) of the hour a run id was made in (ids begin with their time in ms, in hex)."""
    return int(run_id[2:13], 16) // 3_600_000 * 3600


COLUMNS = ("id, workspace, job_id, version, status, trigger, created_at, started_at, finished_at, exit_reason, "
           "error_type, attempt, max_retries, timeout, batch_id, batch_index, done_seq, worker, log_bytes, expired_at, "
           "retry_at, schedule_id, traceparent, parent_span_id, parent_run_id")
SELECT = f"SELECT {COLUMNS} FROM runs"
RETURNED = ", ".join(f"runs.{column.strip()}" for column in COLUMNS.split(","))  # COLUMNS of an UPDATE ... FROM
INSERT = ("INSERT OR IGNORE INTO runs(id, workspace, job_id, version, trigger, created_at, max_retries, timeout, "
          "batch_id, batch_index, schedule_id, traceparent, parent_span_id, parent_run_id, status) "
          "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,'queued')")
OPEN_SQL = "status IN ('queued', 'running')"  # base.OPEN, as literals: so the partial index runs_open applies
ENDED_BADLY_SQL = "status IN ('failed', 'timed_out', 'cancelled')"  # as the partial index runs_ended_badly
STATUSES = frozenset({"queued", "running", "succeeded", "failed", "cancelled", "timed_out"})
# the partial index a status filter walks (the planner, without statistics, would rather walk the workspace's)
# and the term that tells SQLite the partial index holds the rows (it must appear as the index has it)
STATUS_INDEX = {**dict.fromkeys(("queued", "running"), (" INDEXED BY runs_open", f" AND {OPEN_SQL}")),
                **dict.fromkeys(("failed", "cancelled", "timed_out"),
                                (" INDEXED BY runs_ended_badly", f" AND {ENDED_BADLY_SQL}"))}
INSERT_PAYLOAD = "INSERT OR REPLACE INTO payloads(run_id, kind, data, object_key, size) VALUES (?,?,?,?,?)"
ADD_USAGE = ("INSERT INTO usage(workspace, bytes) VALUES (?, ?) "
             "ON CONFLICT(workspace) DO UPDATE SET bytes = bytes + excluded.bytes")


def payload_row(run_id: str, kind: str, payload: Payload) -> tuple:
    """A payloads row: inline bytes, or a stored object's head with its key and size."""
    if isinstance(payload, StoredPayload):
        return run_id, kind, payload.head, payload.key, payload.size
    return run_id, kind, payload, None, None


def as_payload(data: bytes, key: str | None, size: int | None) -> Payload:
    return data if key is None else StoredPayload(key, size, data)


def drop_run_data(db, ids: list[tuple[str]]) -> tuple[int, list[str]]:
    """Delete the runs' payloads, logs and items, taking their bytes off their workspaces' usage; returns the
    bytes freed and the object-store keys of payloads that lived there (the caller deletes those)."""
    freed: dict[str, int] = {}
    keys: list[str] = []
    for (run_id,) in ids:
        workspace, log_bytes = db.execute("SELECT workspace, log_bytes FROM runs WHERE id = ?",
                                          (run_id,)).fetchone()
        size = log_bytes
        for key, payload_bytes in db.execute("SELECT object_key, COALESCE(size, length(data)) FROM payloads "
                                             "WHERE run_id = ? UNION ALL SELECT object_key, size FROM run_items "
                                             "WHERE run_id = ?", (run_id, run_id)):
            size += payload_bytes
            if key is not None:
                keys.append(key)
        freed[workspace] = freed.get(workspace, 0) + size
    db.executemany("DELETE FROM payloads WHERE run_id = ?", ids)
    db.executemany("DELETE FROM logs WHERE run_id = ?", ids)
    db.executemany("DELETE FROM run_items WHERE run_id = ?", ids)
    db.executemany(ADD_USAGE, [(workspace, -size) for workspace, size in freed.items()])
    return sum(freed.values()), keys


@storage_errors
class SqliteRuns:
    def __init__(self, database: Database):
        self.db = database.db
        self.tx = database.tx
        self.path = database.path

    def get(self, run_id: str) -> RunRecord | None:
        row = self.db.execute(f"{SELECT} WHERE id = ?", (run_id,)).fetchone()
        return RunRecord(*row) if row is not None else None

    def _payload(self, run_id: str, kind: str) -> Payload | None:
        row = self.db.execute("SELECT data, object_key, size FROM payloads WHERE run_id = ? AND kind = ?",
                              (run_id, kind)).fetchone()
        return as_payload(*row) if row else None

    def args(self, run_id: str) -> Payload | None:
        return self._payload(run_id, "args")

    def result(self, run_id: str) -> Payload | None:
        return self._payload(run_id, "result")

    def create(self, run: NewRun, args: Payload) -> None:
        with self.tx() as db:
            if db.execute(INSERT, run).rowcount:
                db.execute(INSERT_PAYLOAD, payload_row(run.id, "args", args))
                db.execute(ADD_USAGE, (run.workspace, payload_size(args)))

    def start(self, run_id: str, worker: str, at: float, limit: tuple[str, int] | None = None) -> bool:
        # ``limit`` is for several gateways on one database: alone on its file, the gateway's count is exact
        cur = self.db.execute(
            "UPDATE runs SET status = 'running', started_at = ?, worker = ?, retry_at = NULL WHERE id = ? "
            "AND status = 'queued'",
            (at, worker, run_id))
        return cur.rowcount == 1

    # -- a warm worker's group of a map's runs: each step for all of them in one transaction, one statement ---------
    # (an UPDATE of the rows found by their ids, RETURNING what it wrote: against a statement per row, ~4 us an
    # item less). Their status is a term SQLite must not use an index for ("+status"): it would walk runs_open,
    # every open run, for the group's few rows
    def start_many(self, run_ids: Sequence[str], worker: str, at: float) -> list[bool]:
        with self.tx() as db:
            started = {r[0] for r in db.execute(
                "UPDATE runs SET status = 'running', started_at = ?, worker = ?, retry_at = NULL "
                f"WHERE id IN ({','.join('?' * len(run_ids))}) AND +status = 'queued' RETURNING id",
                (at, worker, *run_ids))}
        return [run_id in started for run_id in run_ids]

    def args_many(self, run_ids: Sequence[str]) -> dict[str, Payload]:
        return {run_id: as_payload(data, key, size) for run_id, data, key, size in self.db.execute(
            "SELECT run_id, data, object_key, size FROM payloads WHERE kind = 'args' AND run_id IN "
            f"({','.join('?' * len(run_ids))})", run_ids)}

    def finish_many(self, ends: Sequence[tuple[str, str | None, str, Payload]], status: str,
                    at: float) -> list[tuple[RunRecord, bool] | None]:
        # the runs still open, found by their ids; each map's counter moved once for all of its runs here (their
        # completion numbers in order); then the rows ended by one UPDATE (each its completion number, from a
        # VALUES list) that returns them as written, and the results inserted with one statement (executemany)
        with self.tx() as db:
            still = dict(db.execute(f"SELECT id, batch_id FROM runs WHERE id IN ({','.join('?' * len(ends))}) "
                                    f"AND +{OPEN_SQL}", [end[0] for end in ends]).fetchall())
            if not still:
                return [None] * len(ends)  # all ended meanwhile (cancelled)
            per_map: dict[str, int] = {}
            for batch_id in still.values():
                if batch_id:
                    per_map[batch_id] = per_map.get(batch_id, 0) + 1
            seqs = {}
            for batch_id, count in per_map.items():
                done, total = db.execute("UPDATE batches SET done = done + ? WHERE id = ? RETURNING done, total",
                                         (count, batch_id)).fetchone()
                seqs[batch_id] = [done - count + 1, total]  # the next completion number to give, the map's total
            values, payloads, usage, complete = [], [], {}, set()
            for run_id, batch_id, workspace, result in ends:
                if run_id not in still:
                    continue
                seq = None
                if batch_id:
                    seq, total = seqs[batch_id]
                    seqs[batch_id][0] += 1
                    if total is not None and seq >= total:
                        complete.add(run_id)
                values += (run_id, seq)
                payloads.append(payload_row(run_id, "result", result))
                usage[workspace] = usage.get(workspace, 0) + payload_size(result)
            ended = {row[0]: row for row in db.execute(
                f"WITH v(id, seq) AS (VALUES {','.join(['(?,?)'] * len(payloads))}) UPDATE runs SET status = ?, "
                "finished_at = ?, started_at = COALESCE(started_at, ?), retry_at = NULL, error_type = NULL, "
                f"done_seq = COALESCE(v.seq, done_seq) FROM v WHERE runs.id = v.id RETURNING {RETURNED}",
                (*values, status, at, at))}
            db.executemany(INSERT_PAYLOAD, payloads)
            db.executemany(ADD_USAGE, list(usage.items()))
        return [(RunRecord(*ended[run_id]), run_id in complete) if run_id in ended else None
                for run_id, _, _, _ in ends]

    def retry(self, run: RunRecord, status: str, reason: str | None, error_type: str | None, at: float,
              retry_at: float | None) -> None:
        with self.tx() as db:
            (log_seq,) = db.execute("SELECT COALESCE(MAX(seq), -1) FROM logs WHERE run_id = ?", (run.id,)).fetchone()
            db.execute("INSERT OR REPLACE INTO attempts(run_id, attempt, status, started_at, finished_at, reason, "
                       "error_type, log_seq) VALUES (?,?,?,?,?,?,?,?)",
                       (run.id, run.attempt, status, run.started_at, at, reason, error_type, log_seq))
            db.execute("UPDATE runs SET status = 'queued', attempt = attempt + 1, exit_reason = ?, started_at = NULL, "
                       "worker = NULL, retry_at = ? WHERE id = ?",
                       (f"attempt {run.attempt + 1} {status}: {reason}", retry_at, run.id))

    def attempts(self, run_id: str) -> list[AttemptRecord]:
        return [AttemptRecord(*r) for r in self.db.execute(
            "SELECT run_id, attempt, status, started_at, finished_at, reason, error_type, log_seq FROM attempts "
            "WHERE run_id = ? ORDER BY attempt", (run_id,))]

    def requeue(self, run_id: str, reason: str) -> None:
        self.db.execute("UPDATE runs SET status = 'queued', exit_reason = ?, started_at = NULL, worker = NULL "
                        "WHERE id = ? AND status IN ('queued', 'running')", (reason, run_id))

    def finish(self, run: RunRecord, status: str, at: float, reason: str | None, error_type: str | None,
               result: Payload) -> tuple[RunRecord, bool]:
        complete, seq = False, None
        with self.tx() as db:
            if run.batch_id:  # its completion number first, so the run's row is written once
                seq, total = db.execute("UPDATE batches SET done = done + 1 WHERE id = ? RETURNING done, total",
                                        (run.batch_id,)).fetchone()
                complete = total is not None and seq >= total
            row = db.execute(
                "UPDATE runs SET status = ?, finished_at = ?, exit_reason = COALESCE(?, exit_reason), error_type = ?, "
                f"started_at = COALESCE(started_at, ?), retry_at = NULL, done_seq = COALESCE(?, done_seq) WHERE id = ? "
                f"RETURNING {COLUMNS}", (status, at, reason, error_type, at, seq, run.id)).fetchone()
            ended = RunRecord(*row)
            db.execute(INSERT_PAYLOAD, payload_row(run.id, "result", result))
            db.execute(ADD_USAGE, (run.workspace, payload_size(result)))
        return ended, complete

    def append_log(self, run_id: str, data: bytes, limit: int, marker: bytes, dropped: bool) -> bool:
        row = self.db.execute("SELECT log_bytes, (SELECT COALESCE(MAX(seq), -1) + 1 FROM logs WHERE run_id = ?), "
                              "workspace FROM runs WHERE id = ?", (run_id, run_id)).fetchone()
        if row is None:
            return False
        before, seq, workspace = row
        size = before + len(data)
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
            db.execute(ADD_USAGE, (workspace, size - before))
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
        return dict(self.db.execute(f"SELECT status, COUNT(*) FROM runs INDEXED BY runs_open WHERE workspace = ? "
                                    f"AND {OPEN_SQL} GROUP BY status", (workspace,)).fetchall())

    def open_totals(self) -> dict[str, int]:
        return dict(self.db.execute(f"SELECT workspace, COUNT(*) FROM runs INDEXED BY runs_open WHERE {OPEN_SQL} "
                                    "GROUP BY workspace").fetchall())

    def search(self, workspace: str, where: RunFilter, limit: int) -> list[RunRecord]:
        # SQLite walks one index backwards in id order and stops after ``limit`` rows: a map's or a job's
        # (the most selective; "+workspace" keeps the planner off the workspace's), else runs_open or
        # runs_ended_badly (a status written as a literal, so the planner sees the partial index applies),
        # runs_by_trigger or runs_by_workspace (succeeded runs: most runs, found soon in id order)
        narrow = where.batch_id is not None or where.job_id is not None or where.parent_run_id is not None
        index, implied = ("", "") if narrow else STATUS_INDEX.get(where.status, ("", ""))
        sql, params = f"{SELECT}{index} WHERE {'+' if narrow else ''}workspace = ?{implied}", [workspace]
        if where.status in STATUSES:
            sql += f" AND status = '{where.status}'"
        elif where.status is not None:
            sql += " AND status = ?"
            params.append(where.status)
        for column, value in (("job_id", where.job_id), ("trigger", where.trigger), ("batch_id", where.batch_id),
                              ("parent_run_id", where.parent_run_id)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        if where.since_id is not None:
            sql += " AND id >= ?"
            params.append(where.since_id)
        if where.before_id is not None:
            sql += " AND id < ?"
            params.append(where.before_id)
        params.append(limit)
        return [RunRecord(*r) for r in self.db.execute(sql + " ORDER BY id DESC LIMIT ?", params)]

    def hour_counts(self, workspace: str, hours: Sequence[int], now: float) -> dict[int, list[tuple[str, str, int]]]:
        """Each hour's runs as (job id, status, count): a settled hour's from ``run_hours`` (counted once, the
        first time it is read settled), the others' counted now. An hour is settled when it ended a while ago,
        every run in it has ended (terminal runs never change status) and no map still taking items could add
        runs to it (a map's items have ids of its creation time); deleting runs drops their hours' rows."""
        if not hours:
            return {}
        frontier = self._unsettled_from(workspace, hours[0])
        settled = {h for h in hours if h + 3600 <= now - SETTLE_AFTER and id_at("r", h + 3600) <= frontier}
        found: dict[int, list[tuple[str, str, int]]] = {}
        if settled:
            for hour, job_id, status, n in self.db.execute(
                    "SELECT hour, job_id, status, n FROM run_hours WHERE workspace = ? AND hour >= ? AND hour <= ?",
                    (workspace, min(settled), max(settled))):
                if hour in settled:
                    rows = found.setdefault(hour, [])
                    if job_id:  # '' marks the hour as counted
                        rows.append((job_id, status, n))
        kept = []
        for hour in hours:
            if hour in found:
                continue
            found[hour] = rows = self._count_hour(workspace, id_at("r", hour), id_at("r", hour + 3600))
            if hour in settled:
                kept += [(workspace, hour, "", "", 0), *((workspace, hour, *row) for row in rows)]
        if kept:
            try:
                with self.tx() as db:
                    db.executemany("INSERT OR REPLACE INTO run_hours(workspace, hour, job_id, status, n) "
                                   "VALUES (?,?,?,?,?)", kept)
            except sqlite3.Error as exc:  # keeping them is an optimisation: the counts stand (a full disk, a lock)
                log.warning("could not keep the overview's counts of %d hours: %s", len(settled), exc)
        return {hour: found[hour] for hour in hours}

    def _count_hour(self, workspace: str, since_id: str, before_id: str) -> list[tuple[str, str, int]]:
        """(job id, status, count) of the runs with ids in the range, from three indexes and none of their rows:
        each job's runs (runs_by_workspace), its open ones (runs_open) and the ones that ended badly
        (runs_ended_badly); the rest succeeded."""
        bounds = (workspace, since_id, before_id)
        left = dict(self.db.execute("SELECT job_id, COUNT(*) FROM runs INDEXED BY runs_by_workspace WHERE workspace = ? "
                                    "AND id >= ? AND id < ? GROUP BY job_id", bounds).fetchall())
        rows = []
        for index, statuses in (("runs_open", OPEN_SQL), ("runs_ended_badly", ENDED_BADLY_SQL)):
            for job_id, status, n in self.db.execute(
                    f"SELECT job_id, status, COUNT(*) FROM runs INDEXED BY {index} WHERE {statuses} AND workspace = ? "
                    "AND id >= ? AND id < ? GROUP BY job_id, status", bounds):
                rows.append((job_id, status, n))
                left[job_id] -= n
        return rows + [(job_id, "succeeded", n) for job_id, n in left.items() if n]

    def _unsettled_from(self, workspace: str, since: int) -> str:
        """The smallest run id at or after which runs may still change or be added: the oldest open run's, or
        the first id of a map (created since ``since``) that may still take items."""
        (oldest_open,) = self.db.execute(
            f"SELECT MIN(id) FROM (SELECT MIN(id) AS id FROM runs INDEXED BY runs_open WHERE {OPEN_SQL} AND "
            f"status = 'queued' AND workspace = ? UNION ALL SELECT MIN(id) FROM runs INDEXED BY runs_open WHERE "
            f"{OPEN_SQL} AND status = 'running' AND workspace = ?)",
            (workspace, workspace)).fetchone()
        (open_map,) = self.db.execute(
            "SELECT MIN(id) FROM batches WHERE workspace = ? AND id >= ? AND cancelled = 0 AND "
            "(total IS NULL OR submitted < total)", (workspace, id_at("b", since))).fetchone()
        return min(oldest_open or "\uffff", f"r-{open_map[2:]}" if open_map else "\uffff")

    def claim_orphans(self, reason: str) -> list[RunRecord]:
        """Alone on its file, a gateway that starts finds every open run orphaned: running ones lost their workers."""
        with self.tx() as db:
            db.execute("UPDATE runs INDEXED BY runs_open SET status = 'queued', started_at = NULL, worker = NULL, "
                       f"exit_reason = ? WHERE {OPEN_SQL} AND status = 'running'", (reason,))
            return [RunRecord(*r) for r in db.execute(
                f"{SELECT} INDEXED BY runs_open WHERE {OPEN_SQL} AND status = 'queued' ORDER BY id")]

    # -- retention ---------------------------------------------------------------------------
    def expire(self, default_days: float, now: float, limit: int) -> Dropped:
        rows = self.db.execute(
            "SELECT r.id FROM runs r JOIN versions v ON v.job_id = r.job_id AND v.version = r.version "
            "WHERE r.finished_at IS NOT NULL AND r.expired_at IS NULL AND r.finished_at < "
            "? - 86400.0 * COALESCE(json_extract(v.resource, '$.retention_days'), ?) LIMIT ?",
            (now, default_days, limit)).fetchall()
        ids = [(r[0],) for r in rows]
        if not ids:
            return Dropped(0, 0, [])
        with self.tx() as db:
            freed, keys = drop_run_data(db, ids)
            db.executemany("UPDATE runs SET expired_at = ?, log_bytes = 0 WHERE id = ?", [(now, i) for (i,) in ids])
        return Dropped(len(ids), freed, keys)

    def delete_finished(self, days: float, now: float, limit: int) -> Dropped:
        ids = [(r[0],) for r in self.db.execute(
            "SELECT id FROM runs WHERE finished_at IS NOT NULL AND finished_at < ? LIMIT ?",
            (now - 86400.0 * days, limit))]
        if not ids:
            return Dropped(0, 0, [])
        with self.tx() as db:
            freed, keys = drop_run_data(db, ids)
            db.executemany("DELETE FROM attempts WHERE run_id = ?", ids)
            db.executemany("DELETE FROM runs WHERE id = ?", ids)
            db.executemany("DELETE FROM run_hours WHERE hour = ?", [(h,) for h in {hour_of(i) for (i,) in ids}])
        return Dropped(len(ids), freed, keys)

    def stored_keys(self, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(keys), 500):
            chunk = list(keys[start:start + 500])
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self.db.execute(
                f"SELECT object_key FROM payloads WHERE object_key IN ({marks}) UNION ALL "
                f"SELECT object_key FROM run_items WHERE object_key IN ({marks})", chunk * 2))
        return found
