"""A real PostgreSQL for tests and benches: ``initdb`` into a fresh folder, listening on a Unix socket there
(and on a free loopback port), as the ``postgres`` user when we are root (the server refuses root).

``PostgresServer.database()`` makes a fresh, empty database and returns its URL.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

_names = itertools.count()


def find_bin() -> Path | None:
    """The newest installed server's bin folder (Debian's /usr/lib/postgresql/N/bin), or OPBOX_TEST_PG_BIN."""
    if os.environ.get("OPBOX_TEST_PG_BIN"):
        return Path(os.environ["OPBOX_TEST_PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="opbox-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.proc: subprocess.Popen | None = None

    def _as_user(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", self.user, "--", *argv] if os.geteuid() == 0 else argv

    def start(self) -> "PostgresServer":
        if os.geteuid() == 0:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        if not self.data.exists():
            subprocess.run(self._as_user([str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user,
                                          "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"]),
                           check=True, capture_output=True)
        log = open(self.root / "server.log", "ab")
        # fsync off and a small shared_buffers: a test server on a shared machine, not a durability test
        self.proc = subprocess.Popen(self._as_user([
            str(self.bin / "postgres"), "-D", str(self.data), "-k", str(self.root), "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off", "-c", "max_connections=300", "-c", "shared_buffers=64MB"]),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not (self.root / f".s.PGSQL.{self.port}").exists() or not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start:\n{(self.root / 'server.log').read_text()}")
            time.sleep(0.1)
        return self

    def _ready(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url("postgres"), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@/{database}?host={self.root}&port={self.port}"

    def tcp_url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A fresh, empty database's URL (over the Unix socket)."""
        import psycopg

        name = f"t{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def halt(self) -> None:
        """Stop the server (fast shutdown: sessions are ended), keeping its data: ``start`` brings it back."""
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run(self._as_user([str(self.bin / "pg_ctl"), "-D", str(self.data), "stop", "-m", "fast"]),
                           check=True, capture_output=True)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: smart shutdown; then fast
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)
