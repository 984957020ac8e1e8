"""A streaming run's items in SQLite: ``run_items``, one row per value its generator yielded."""

from __future__ import annotations

from ..base import Payload, payload_size
from .connection import Database, storage_errors
from .runs import ADD_USAGE, as_payload, payload_row


@storage_errors
class SqliteItems:
    def __init__(self, database: Database):
        self.db = database.db
        self.tx = database.tx
        self.path = database.path

    def add(self, run_id: str, workspace: str, seq: int, item: Payload) -> bool:
        _, _, data, key, size = payload_row(run_id, "item", item)
        with self.tx() as db:
            added = db.execute("INSERT OR IGNORE INTO run_items(run_id, seq, data, object_key, size) VALUES (?,?,?,?,?)",
                               (run_id, seq, data, key, payload_size(item))).rowcount == 1
            if added:
                db.execute(ADD_USAGE, (workspace, payload_size(item)))
        return added

    def after(self, run_id: str, after: int, limit: int) -> list[tuple[int, Payload]]:
        rows = self.db.execute("SELECT seq, data, object_key, size FROM run_items WHERE run_id = ? AND seq > ? "
                               "ORDER BY seq LIMIT ?", (run_id, after, limit)).fetchall()
        return [(seq, as_payload(data, key, size)) for seq, data, key, size in rows]

    def get(self, run_id: str, seq: int) -> Payload | None:
        row = self.db.execute("SELECT data, object_key, size FROM run_items WHERE run_id = ? AND seq = ?",
                              (run_id, seq)).fetchone()
        return as_payload(*row) if row else None

    def count(self, run_id: str) -> int:
        return self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM run_items WHERE run_id = ?", (run_id,)).fetchone()[0]
