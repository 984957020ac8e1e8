"""A streaming run's items in PostgreSQL: ``run_items``, one row per value its generator yielded."""

from __future__ import annotations

from ..base import Payload, payload_size
from .connection import Database, storage_errors
from .runs import ADD_USAGE, as_payload, payload_row

ADD = f"""
WITH i AS (INSERT INTO run_items(run_id, seq, data, object_key, size) VALUES (%s,%s,%s,%s,%s)
           ON CONFLICT (run_id, seq) DO NOTHING RETURNING size),
u AS (INSERT INTO usage(workspace, bytes) SELECT %s, size FROM i {ADD_USAGE})
SELECT count(*) FROM i"""


@storage_errors
class PostgresItems:
    def __init__(self, database: Database):
        self.db = database
        self.where = database.where

    def add(self, run_id: str, workspace: str, seq: int, item: Payload) -> bool:
        data, key, _ = payload_row(item)
        return self.db.one(ADD, (run_id, seq, data, key, payload_size(item), workspace))[0] == 1

    def after(self, run_id: str, after: int, limit: int) -> list[tuple[int, Payload]]:
        rows = self.db.all("SELECT seq, data, object_key, size FROM run_items WHERE run_id = %s AND seq > %s "
                           "ORDER BY seq LIMIT %s", (run_id, after, limit))
        return [(seq, as_payload(data, key, size)) for seq, data, key, size in rows]

    def get(self, run_id: str, seq: int) -> Payload | None:
        row = self.db.one("SELECT data, object_key, size FROM run_items WHERE run_id = %s AND seq = %s", (run_id, seq))
        return as_payload(*row) if row else None

    def count(self, run_id: str) -> int:
        return self.db.one("SELECT COALESCE(MAX(seq), 0) FROM run_items WHERE run_id = %s", (run_id,))[0]
