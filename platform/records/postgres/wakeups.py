"""Wake-ups across gateways: LISTEN/NOTIFY on the channel ``opbox``.

A key the notifier wakes locally (a run ended, a map has a new result, a run has new log output or
items) is also published to the other gateways, so a long-poll or a stream held by gateway A answers
when the run ends on gateway B. Publishing never blocks the caller: keys go through a queue to a thread
that sends what has gathered as one statement; another thread LISTENs on a connection of its own and
hands each key from another gateway to ``deliver`` (which must be thread-safe). A notice lost while a
connection is re-made only delays a waiter until its own timeout (every wait re-checks the records).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

import psycopg

from .connection import KEEPALIVE

log = logging.getLogger("opbox.records")

CHANNEL = "opbox"
RETRY = 1.0  # seconds before a lost connection is made again


class Wakeups:
    def __init__(self, url: str, gateway: str, deliver: Callable[[str], None]):
        self.url, self.gateway, self.deliver = url, gateway, deliver
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._threads = [threading.Thread(target=self._listen, name="opbox-listen", daemon=True),
                         threading.Thread(target=self._send, name="opbox-notify", daemon=True)]
        for thread in self._threads:
            thread.start()
        self._listening.wait(10)

    def publish(self, key: str) -> None:
        self._queue.put(key)

    def close(self) -> None:
        self._stop.set()
        self._queue.put("")
        for thread in self._threads:
            thread.join(timeout=5)

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=10, **KEEPALIVE)

    def _listen(self) -> None:
        prefix = self.gateway + " "
        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=1.0):
                            sender, _, key = notice.payload.partition(" ")
                            if sender + " " != prefix and key:
                                self._deliver(key)
            except psycopg.Error as exc:
                log.warning("listening for other gateways' wake-ups failed (%s); trying again", str(exc).strip())
                self._stop.wait(RETRY)

    def _deliver(self, key: str) -> None:
        try:
            self.deliver(key)
        except RuntimeError:  # the gateway's loop has closed: it is stopping
            self._stop.set()

    def _send(self) -> None:
        conn: psycopg.Connection | None = None
        while not self._stop.is_set():
            keys = [self._queue.get()]
            while True:
                try:
                    keys.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            payloads = [f"{self.gateway} {k}" for k in dict.fromkeys(keys) if k]
            if not payloads:
                continue
            try:
                if conn is None:
                    conn = self._connect()
                conn.execute(f"SELECT pg_notify('{CHANNEL}', p) FROM unnest(%s::text[]) p", (payloads,))
            except psycopg.Error as exc:
                log.warning("waking the other gateways failed (%s)", str(exc).strip())
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(RETRY)
        if conn is not None:
            conn.close()
