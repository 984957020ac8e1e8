"""The composition root: builds the platform's parts from Settings and wires them together."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from dataclasses import replace
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from opbox.config import credentials_path
from opbox.errors import ConfigError

from .backends.base import MirrorsSecrets, Serving, WorkerPools, require, supports
from .backends.registry import make_backend, make_builder
from .control import admin
from .control.auth import SERVICE_DELETED, TOKENS_REVOKED, Auth, RateLimit
from .control.deploys import Deploys
from .control.files import Files
from .control.items import RunItems
from .control.payloads import Payloads
from .ids import check_workspace
from .control.runs import CANCEL_PREFIX, Limits, Runs
from .control.retention import Retention
from .control.schedules import Schedules
from .control.secrets import Secrets, load_key
from .control.services import SERVICE_CHANGED, Services
from .control.views import Views
from .records.base import Records
from .records.sqlite import open_sqlite
from .proxy.proxy import Proxy
from .settings import Settings
from .tracing import run_spans

log = logging.getLogger("opbox.platform")
CLAIM_EVERY = 1.0  # seconds between the leader's looks for the runs of gateways that died
FORGET_TOKENS_EVERY = 5  # of those: several gateways read tokens from the records again this often


def _secret(home: Path, given: Path | None = None) -> bytes:
    if given is not None:  # OPBOX_SECRET_FILE: shared by several gateways, never made here
        try:
            return bytes.fromhex(given.read_text().strip())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"OPBOX_SECRET_FILE {given} must be a readable file of hex digits ({exc})") from None
    path = home / "secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def open_records(home: Path, database_url: str | None = None) -> Records:
    """The platform's records, migrated to this version's schema: the PostgreSQL database at ``database_url``
    (OPBOX_DATABASE_URL), else the SQLite state file in its home."""
    if database_url:
        if not database_url.startswith(("postgresql://", "postgres://")):
            scheme = database_url.split(":")[0]
            raise ConfigError(f"OPBOX_DATABASE_URL must be a postgresql:// URL, got {scheme}:...")
        try:
            from .records.postgres import open_postgres
        except ImportError as exc:  # psycopg is an extra
            raise ConfigError("OPBOX_DATABASE_URL needs PostgreSQL's driver: pip install 'opbox[postgres]' "
                              f"({exc})") from None
        return open_postgres(database_url)
    return open_sqlite(home / "state.db")


def create_workspace(home: Path | None, name: str) -> dict:
    """``opbox workspace create``: a workspace and its admin token, written to the records directly."""
    settings = Settings.from_env(home=home)
    records = open_records(settings.home, settings.database_url)
    try:
        return admin.create_workspace(records, name)
    finally:
        records.close()


def collect_garbage(settings: Settings) -> dict:
    """``opbox gc``: expire, delete and collect now, on the platform's machine (beside a running gateway)."""
    home = settings.home
    records = open_records(home, settings.database_url)
    try:
        store = make_store(settings, _secret(home, settings.secret_file))
        return asyncio.run(Retention(records, store, settings).collect()).to_dict()
    finally:
        records.close()


def make_store(settings: Settings, secret: bytes):
    from .store import LocalStore, open_store

    if settings.store_url:
        extra = {}
        if settings.s3_endpoint_url and "endpoint=" not in settings.store_url:
            extra["endpoint_url"] = settings.s3_endpoint_url
        if settings.s3_public_endpoint and "public_endpoint=" not in settings.store_url:
            extra["public_endpoint_url"] = settings.s3_public_endpoint
        return open_store(settings.store_url, secret=secret, base_url=settings.url, **extra)
    return LocalStore(settings.home / "store", secret=secret, base_url=settings.url)


class Platform:
    """``bound_url``: the address the gateway's socket is bound to (port 0 picks one), where
    runtimes on this machine reach it; clients use ``settings.url`` (OPBOX_PUBLIC_URL if set)."""

    def __init__(self, settings: Settings, bound_url: str | None = None):
        if bound_url:
            settings = replace(settings, public_url=settings.public_url or bound_url)
        self.settings = settings
        home = settings.home
        home.mkdir(parents=True, exist_ok=True)
        self.secret = _secret(home, settings.secret_file)
        self.records = open_records(home, settings.database_url)
        self.auth = Auth(self.records, self.secret, RateLimit(settings.rate_limit, settings.rate_burst))
        self.store = make_store(settings, self.secret)
        self.backend = make_backend(settings, self.auth.internal_token, bound_url or settings.url)
        self.secrets = Secrets(self.records, load_key(settings.secrets_key_file or home / "secrets.key"),
                               on_change=self._secrets_changed,
                               mirror=require(self.backend, MirrorsSecrets) if supports(self.backend, MirrorsSecrets)
                               else None)
        self.runs = Runs(self.records, self.backend, Limits(
            max_payload=settings.max_payload, max_log_bytes=settings.max_log_bytes, cancel_grace=settings.cancel_grace,
            max_open_runs=settings.max_open_runs, storage_quota=settings.storage_quota), secret_env=self.secrets.env)
        self.payloads = Payloads(self.store, home / "spool", settings.payload_inline, self.records.uploads,
                                 self.runs.metrics)
        self.files = Files(self.payloads, settings.max_payload)  # opbox.File contents, by hash
        self.items = RunItems(self.records, self.runs)  # streaming runs' items
        self.deploys = Deploys(self.records, self.store, make_builder(settings, self.store, self.backend), self.runs,
                               settings.max_upload, check_secrets=self.secrets.check)
        self.schedules = Schedules(self.records, self.runs, self.deploys)
        self.deploys.on_ready.append(self._schedule_from_deploy)
        self.services = Services(self.records, self.backend, self.deploys, settings.max_payload,
                                 base_url=lambda: self.settings.url, on_delete=self.auth.service_deleted)
        self.runs.on_run_end = self.auth.run_ended  # a run's caller token lives while it runs (jobs calling jobs)
        self.auth.publish = self.runs.notifier.notify  # and, several gateways sharing the records, to the others
        self.services.publish = self.runs.notifier.notify
        if supports(self.backend, WorkerPools):
            self.auth.held_run = require(self.backend, WorkerPools).held_run
        if bound_url:
            self._refresh_credentials()
        self.proxy = Proxy(self.services)  # service calls: replica choice, in-flight counts, connections
        self.retention = Retention(self.records, self.store, settings)
        self.views = Views(self.records)
        self.metrics = self.runs.metrics
        self.runs.spans = run_spans()  # OTEL_EXPORTER_OTLP_ENDPOINT and opbox[otel]: a span per run, at its end
        self.metrics.gauges(self._levels)  # the runs API across jobs, maps' progress, the dashboard's overview
        self._collector: asyncio.Task | None = None  # runs the retention every gc_interval
        self._claimer: asyncio.Task | None = None  # the leader's: takes over the runs of gateways that died

    def _secrets_changed(self, workspace: str) -> None:
        """Resolve the workspace's versions again when next used, here and (``secrets:`` notice) on the other
        gateways sharing the records."""
        self.runs.forget_versions(workspace)
        self.runs.notifier.notify(f"secrets:{workspace}")

    def _delivered(self, key: str) -> None:
        """A notice from another gateway: wake the waiters for it, and act on what changed there: a workspace's
        secrets, a run cancelled (``cancel:``: this gateway's worker may run it), an item of a map ended, a run
        ended (its caller token and its children here), a token revoked, a service deleted."""
        if key.startswith("secrets:"):
            self.runs.forget_versions(key.removeprefix("secrets:"))
        elif key.startswith(CANCEL_PREFIX):
            self.runs.stop_worker(key.removeprefix(CANCEL_PREFIX))
        elif key.startswith("batch:"):  # an item of a map ended there: a slot of its concurrency may be free
            self.runs.batch_progress(key.removeprefix("batch:"))
        elif key.startswith("r-"):  # a run ended there: its caller token is revoked here too, its children go
            self.auth.run_ended(key)
            self.runs.ended_elsewhere(key)
        elif key == TOKENS_REVOKED:
            self.auth.forget_cached()
        elif key.startswith(SERVICE_DELETED):
            workspace, _, name = key.removeprefix(SERVICE_DELETED).partition("/")
            self.auth.service_deleted(workspace, name, here=False)
            asyncio.ensure_future(self.services.follow(workspace, name))
        elif key.startswith(SERVICE_CHANGED):  # deployed again there: replicas of this gateway's own follow
            workspace, _, name = key.removeprefix(SERVICE_CHANGED).partition("/")
            asyncio.ensure_future(self.services.follow(workspace, name))
        self.runs.notifier.deliver(key)

    def _schedule_from_deploy(self, workspace: str, job, spec: dict) -> None:
        """A deploy that carries a schedule sets the job's (one without leaves the job's as it is)."""
        if spec.get("schedule") is not None:
            self.schedules.set(workspace, job, spec["schedule"])

    def _levels(self):
        """The metrics read when scraped: pools, workers started, open runs, services' replicas."""
        workers = GaugeMetricFamily("opbox_pool_workers", "Warm workers per job, by state (idle, busy)",
                                    labels=["workspace", "job", "state"])
        queued = GaugeMetricFamily("opbox_pool_queued_runs", "Runs waiting in a pool for a worker", labels=["workspace", "job"])
        starts = CounterMetricFamily("opbox_worker_starts", "Workers started (cold starts) per job", labels=["workspace", "job"])
        if supports(self.backend, WorkerPools):
            for size in require(self.backend, WorkerPools).pool_sizes():
                workers.add_metric([size.workspace, size.job, "busy"], size.busy)
                workers.add_metric([size.workspace, size.job, "idle"], size.workers - size.busy)
                queued.add_metric([size.workspace, size.job], size.queued)
                starts.add_metric([size.workspace, size.job], size.started)
        open_runs = GaugeMetricFamily("opbox_open_runs", "Runs queued or running per workspace", labels=["workspace"])
        for workspace, count in self.runs.open_runs.items():
            open_runs.add_metric([workspace], count)
        replicas = GaugeMetricFamily("opbox_service_replicas", "Replicas each service is set to run",
                                     labels=["workspace", "service"])
        if supports(self.backend, Serving):
            for row in self.records.services.all():
                replicas.add_metric([row.workspace, row.name], row.replicas)
        return [workers, queued, starts, open_runs, replicas]

    def bootstrap(self) -> dict | None:
        """First start: make a workspace and an admin token. Uses OPBOX_WORKSPACE / OPBOX_TOKEN when set.

        Returns the credentials when they were created now (the token is shown only then).
        """
        workspace = check_workspace(self.settings.workspace or "default")
        token = self.settings.token
        if token and self.auth.is_active(token):
            self._save_credentials(workspace, token)
            return None
        if token and self.auth.is_revoked(token):
            log.warning("OPBOX_TOKEN is a revoked token: it stays revoked and the platform starts without it "
                        "(unset it, or set it to an active token: `opbox tokens create NAME`)")
            return None
        if token is None and self.auth.has_tokens(workspace):
            return None
        _, token = self.auth.create_token(workspace, name="bootstrap", role="admin", token=token)
        return self._save_credentials(workspace, token)

    def _save_credentials(self, workspace: str, token: str) -> dict:
        creds = {"url": self.settings.url, "workspace": workspace, "token": token}
        path = credentials_path(self.settings.home)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(creds, f)
        return creds

    def _refresh_credentials(self) -> None:
        """Saved credentials name the gateway's address of this start (port 0 picks a new one)."""
        creds = credentials_path(self.settings.home)
        if creds.exists():
            data = json.loads(creds.read_text())
            data["url"] = self.settings.url
            self._save_credentials(data["workspace"], data["token"])

    async def start(self) -> None:
        self.records.leadership.start()  # several gateways on one database: join them before starting runs
        loop = asyncio.get_running_loop()
        self.runs.notifier.publish = self.records.wakeups(lambda key: loop.call_soon_threadsafe(self._delivered, key))
        await self.backend.start(self.runs)
        await self.secrets.sync()  # a backend keeping secrets of its own catches up
        await self.services.start()  # redeploys the services recorded before a restart
        failed_builds = self.deploys.recover()
        if failed_builds:
            log.warning("%d builds were interrupted by a stop of the platform: their versions failed", failed_builds)
        leadership = self.records.leadership
        if not leadership.shared or leadership.held():  # else the leader takes over what dead gateways left
            requeued = self.runs.recover()
            if requeued:
                log.info("took over %d open runs at start", requeued)
        self.schedules.start(leads=leadership.held, shared=leadership.shared)
        self._collector = asyncio.ensure_future(self._collect_every(self.settings.gc_interval))
        if leadership.shared:
            self._claimer = asyncio.ensure_future(self._share_every(CLAIM_EVERY))

    async def _share_every(self, interval: float) -> None:
        """Several gateways on one database: each counts the open runs of the others (the open-runs quota is
        the workspace's, not a gateway's); the leader takes over the open runs of gateways that died (their
        queued runs, and their running ones, which lost their workers with them), so their maps finish here."""
        ticks = 0
        while True:
            await asyncio.sleep(interval)
            try:
                self.runs.count_open_elsewhere()
            except Exception:  # the database is away: the last counts stand
                log.exception("counting the other gateways' open runs failed")
            ticks += 1
            if ticks % FORGET_TOKENS_EVERY == 0:  # a revocation whose notice was lost holds this long at most
                self.auth.forget_cached()
            if not self.records.leadership.held():
                continue
            try:
                taken = self.runs.recover("requeued: the gateway that ran it stopped")
            except Exception:  # the database is away: try again next time
                log.exception("taking over the runs of stopped gateways failed")
                continue
            if taken:
                log.warning("took over %d open runs of gateways that stopped", taken)

    async def _collect_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if not self.records.leadership.held():
                continue  # another gateway on the same database collects
            try:
                done = await self.retention.collect()
            except Exception:  # storage trouble: say so, and try again next time
                log.exception("collecting expired runs and unused files failed")
                continue
            if any(done.to_dict().values()):
                log.info("retention: %s", done.to_dict())

    def begin_shutdown(self) -> None:
        """SIGTERM/SIGINT: parked workers go, long-polls answer and streams end (saying so); busy workers
        finish their runs and hand the results in while ``drain`` waits."""
        if supports(self.backend, WorkerPools):
            require(self.backend, WorkerPools).release_parked()
        self.runs.notifier.close()

    async def drain(self) -> None:
        """Wait, up to ``shutdown_grace`` seconds, until no run is in the hands of a worker that would die
        with the gateway: a run that completes in the grace is stored and never runs again after a restart."""
        if not supports(self.backend, WorkerPools):
            return
        pools = require(self.backend, WorkerPools)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_grace
        while pools.busy() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if pools.busy():
            log.warning("stopping with %d runs still running: they run again after the restart", pools.busy())

    async def close(self) -> None:
        for task in (self._collector, self._claimer):
            if task is not None:
                task.cancel()
        self.schedules.close()
        await self.proxy.close()
        await self.backend.close()
        if self.runs.spans is not None:
            await asyncio.to_thread(self.runs.spans.shutdown)  # export what is batched
        self.records.close()
