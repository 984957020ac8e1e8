"""Several gateways on one database: who leads (fires schedules, runs retention) and who is alive.

On a connection of its own (never the pool's), a gateway holds two session advisory locks:
- its *liveness* lock, ``(GATEWAYS, hashtext(gateway id))``, for as long as it lives: the runs it started
  carry its id in ``worker`` (``{gateway}/{worker}``), so another gateway can tell that their owner died
  (``pg_try_advisory_xact_lock`` on that key succeeds) and queue them again;
- the *leader's* lock, ``LEADER``, tried every ``LEAD_POLL`` seconds by the gateways that do not hold it.
When a gateway dies its connection closes and the server drops both locks at once (on a vanished node, the
server's TCP keepalives on this connection, set per session, end it in about 11 s): the next try of another
gateway takes the lead, so leadership moves within about ``LEAD_POLL`` seconds of that. The leader checks its connection every
``LEAD_POLL`` seconds; a lost one ends its lead (and a new connection tries again).
"""

from __future__ import annotations

import logging
import secrets
import threading

import psycopg

from .connection import KEEPALIVE

log = logging.getLogger("opbox.records")

LEADER = 0x6F70626F786C6561  # the lock whoever leads holds
GATEWAYS = 0x6F70  # the class of the gateways' liveness locks (two-key form: a space apart from LEADER)
SERVER_KEEPALIVE = ("SELECT set_config('tcp_keepalives_idle', '5', false), set_config('tcp_keepalives_interval', '2', "
                    "false), set_config('tcp_keepalives_count', '3', false)")
LEAD_POLL = 1.0  # seconds between tries (followers) and connection checks (the leader)


class Lead:
    """This gateway's liveness and, when it has it, the lead; ``start`` takes the liveness lock before
    returning (so no run is started in the name of a gateway others could think dead)."""

    shared = True

    def __init__(self, url: str, poll: float = LEAD_POLL):
        self.url = url
        self.poll = poll
        self.gateway = "g" + secrets.token_hex(4)
        self._held = False
        self._conn: psycopg.Connection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._connect()
            self._try()  # at once: a gateway starting alone leads from its first look at the schedules
            self._thread = threading.Thread(target=self._run, name="opbox-lead", daemon=True)
            self._thread.start()

    def held(self) -> bool:
        return self._held

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._drop()

    def _connect(self) -> None:
        self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10, **KEEPALIVE)
        # the server's side too: a gateway whose node vanished (no FIN) loses its locks in ~11 s, not hours
        self._conn.execute(SERVER_KEEPALIVE)
        self._conn.execute("SELECT pg_advisory_lock(%s::int4, hashtext(%s))", (GATEWAYS, self.gateway))

    def _try(self) -> None:
        if self._held:
            self._conn.execute("SELECT 1")
        elif self._conn.execute("SELECT pg_try_advisory_lock(%s::bigint)", (LEADER,)).fetchone()[0]:
            self._held = True
            log.info("gateway %s leads: it fires schedules and runs retention", self.gateway)

    def _drop(self) -> None:
        if self._held:
            log.warning("gateway %s no longer leads", self.gateway)
        self._held = False
        if self._conn is not None:
            self._conn.close()  # the server releases the locks with the session
            self._conn = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._conn is None:
                    self._connect()
                self._try()
            except psycopg.Error as exc:
                log.warning("the lead's connection failed (%s); trying again", str(exc).strip())
                self._drop()
            self._stop.wait(self.poll)
