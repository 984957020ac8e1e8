"""A real platform for tests and benches: ``opbox up --port 0`` in a subprocess, on loopback.

The gateway announces its address on its first line; credentials are in its home's
credentials.json. ``running_platform`` stops it (and its workers) on exit.

Its records are in the home's SQLite file, or, once ``use_postgres`` was called (conftest does under
OPBOX_TEST_DATABASE=postgres), in a database of their own on PostgreSQL: one per home, so a platform started
again on the same home finds its records again. A caller's OPBOX_DATABASE_URL (``ON_SQLITE`` among them) wins.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from opbox.client import Client
from opbox.config import ClientConfig

OPBOX = [sys.executable, "-m", "opbox.cli"]

# for tests about the SQLite state file itself (an empty URL is "unset": the home's state.db)
ON_SQLITE = {"OPBOX_DATABASE_URL": ""}

_fresh_database: Callable[[], str] | None = None
_home_databases: dict[Path, str] = {}


def use_postgres(fresh_database: Callable[[], str] | None) -> None:
    """From now on, each new home's platforms keep their records in ``fresh_database()`` (a URL); None: SQLite."""
    global _fresh_database
    _fresh_database = fresh_database


def database_env(home: Path, env: dict | None) -> dict:
    """OPBOX_DATABASE_URL for a platform on ``home``: none when ``env`` names one or no PostgreSQL is in use,
    else the home's own database."""
    if _fresh_database is None or (env and "OPBOX_DATABASE_URL" in env):
        return {}
    key = Path(home).resolve()
    if key not in _home_databases:
        _home_databases[key] = _fresh_database()
    return {"OPBOX_DATABASE_URL": _home_databases[key]}


@dataclass
class RunningPlatform:
    home: Path
    url: str
    token: str
    workspace: str
    proc: subprocess.Popen
    env: dict = field(default_factory=dict)

    def client(self, token: str | None = None, workspace: str | None = None) -> Client:
        return Client(ClientConfig(self.url, token or self.token, workspace or self.workspace))

    def http(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token or self.token}"}, timeout=60)

    def log(self) -> str:
        return (self.home / "gateway.log").read_text(errors="replace")

    def records_rows(self, sql: str) -> list[tuple]:
        """The rows of a query (no parameters) on the platform's records: its SQLite file, read-only, or its
        PostgreSQL database."""
        url = self.env.get("OPBOX_DATABASE_URL")
        if url:
            import psycopg

            with psycopg.connect(url) as conn:
                return conn.execute(sql).fetchall()
        db = sqlite3.connect(f"file:{self.home / 'state.db'}?mode=ro", uri=True)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()

    def records_bytes(self) -> bytes:
        """Everything the records hold, as kept: the SQLite file and its WAL, or every PostgreSQL table in COPY's
        binary format (text and bytea values verbatim), for checks that a value is never stored in clear."""
        url = self.env.get("OPBOX_DATABASE_URL")
        if not url:
            return b"".join(p.read_bytes() for p in sorted(self.home.glob("state.db*")))
        import psycopg

        out = bytearray()
        with psycopg.connect(url) as conn:
            tables = [t for (t,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
            for table in tables:
                with conn.cursor().copy(f'COPY "{table}" TO STDOUT (FORMAT binary)') as copy:
                    for chunk in copy:
                        out += chunk
        return bytes(out)

    def kill(self, sig=signal.SIGKILL) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(30)


def start(home: Path, port: int = 0, extra_env: dict | None = None, timeout: float = 30) -> RunningPlatform:
    home.mkdir(parents=True, exist_ok=True)
    # most tests hand host folders to user code (marker files, data): they run unsealed; the sandbox
    # (OPBOX_SANDBOX=auto, the product's default) has its own end-to-end tests in test_sandbox.py
    env = {**os.environ, "OPBOX_HOME": str(home), "PYTHONUNBUFFERED": "1", "OPBOX_SANDBOX": "off",
           **database_env(home, extra_env), **(extra_env or {})}
    for name in ("OPBOX_URL", "OPBOX_TOKEN", "OPBOX_WORKSPACE"):
        if extra_env is None or name not in extra_env:
            env.pop(name, None)
    log = open(home / "gateway.log", "ab")
    before = log.tell()  # a platform started again on its home appends: its address is past what is there
    proc = subprocess.Popen([*OPBOX, "up", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"platform exited with {proc.returncode}:\n{(home / 'gateway.log').read_text()}")
        match = re.search(r"opbox gateway on (http://\S+)", (home / "gateway.log").read_bytes()[before:].decode(
            errors="replace"))
        if match:
            url = match.group(1)
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError(f"platform did not start in {timeout} s:\n{(home / 'gateway.log').read_text()}")
    creds = json.loads((home / "credentials.json").read_text())
    return RunningPlatform(home, url, creds["token"], creds["workspace"], proc, env)


def stop(plat: RunningPlatform) -> None:
    if plat.proc.poll() is None:
        plat.proc.send_signal(signal.SIGTERM)
        try:
            plat.proc.wait(15)
        except subprocess.TimeoutExpired:
            plat.proc.kill()
            plat.proc.wait(5)


@contextmanager
def running_platform(home: Path, **kwargs):
    plat = start(home, **kwargs)
    try:
        yield plat
    finally:
        stop(plat)


class Gateway:
    """One of several gateways sharing a home and a database (OPBOX_DATABASE_URL in ``env``, else the home's, as
    ``start`` picks it), with a log of its own (``gateway-{name}.log``); ``http`` calls its workspace "default"
    with ``token``."""

    def __init__(self, home: Path, name: str, env: dict, token: str):
        env = {**database_env(home, env), **env}
        self.log_path = home / f"gateway-{name}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "opbox.cli", "up", "--port", "0"], env=env,
                                     stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            match = re.search(r"opbox gateway on (http://\S+)", self.log())
            if match:
                self.url = match.group(1)
                try:
                    if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"gateway {name} did not start:\n{self.log()}")
            time.sleep(0.1)
        self.http = httpx.Client(base_url=f"{self.url}/default", headers={"Authorization": f"Bearer {token}"},
                                 timeout=120)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def leads(self) -> bool:
        return "leads: it fires schedules" in self.log()

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
