"""Capturing what a run prints, at the file-descriptor level (so C extensions and child
processes are caught too), and shipping it to the gateway while the run goes on."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from typing import Callable


SHIP_CHUNK = 1024 * 1024  # bytes per request to the gateway
MAX_BACKLOG = 8 * 1024 * 1024  # unsent output beyond this is skipped (the platform keeps the newest anyway)


class OutputCapture:
    def __init__(self, ship: Callable[[str, bytes], None], interval: float = 0.5):
        self.ship = ship
        self.interval = interval
        self.file = tempfile.TemporaryFile()
        self.fd = self.file.fileno()
        self.saved = (os.dup(1), os.dup(2))
        self.lock = threading.Lock()
        self.run_id: str | None = None
        self.pos = 0
        self.wake = threading.Event()
        threading.Thread(target=self._flusher, name="opbox-log-flusher", daemon=True).start()

    def start(self, run_id: str) -> None:
        _flush_std()
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        with self.lock:
            self.run_id, self.pos = run_id, 0
        os.dup2(self.fd, 1)
        os.dup2(self.fd, 2)

    def stop(self) -> None:
        _flush_std()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        with self.lock:
            self._ship_new()
            self.run_id = None

    def _ship_new(self) -> None:
        end = os.fstat(self.fd).st_size
        if self.run_id is None or end <= self.pos:
            return
        if end - self.pos > MAX_BACKLOG:
            skipped = end - MAX_BACKLOG - self.pos
            self.pos = end - MAX_BACKLOG
            self._send(f"[opbox: {skipped} bytes of output skipped]\n".encode())
        while self.pos < end:
            data = os.pread(self.fd, min(SHIP_CHUNK, end - self.pos), self.pos)
            if not data:
                break
            self.pos += len(data)
            self._send(data)

    def _send(self, data: bytes) -> None:
        try:
            self.ship(self.run_id, data)
        except Exception as exc:  # logs are best effort; the run's result is not
            os.write(self.saved[1], f"opbox: could not ship logs: {exc}\n".encode())

    def _flusher(self) -> None:
        while not self.wake.wait(self.interval):
            if self.run_id is not None and self.lock.acquire(blocking=False):
                try:
                    self._ship_new()
                finally:
                    self.lock.release()


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
