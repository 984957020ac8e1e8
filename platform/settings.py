"""The platform's settings: from the environment (OPBOX_*), overridable by ``opbox up`` flags.

Each setting is written once, as a field with its default and the variable it is read from
(``setting``); ``from_env`` reads them all, so a default never has a second copy to drift.
The CLI builds one ``Settings`` and the composition root hands its values down.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from opbox.config import opbox_home
from opbox.errors import ConfigError
from opbox.resource import parse_quantity


def setting(env: str | None = None, default: Any = None, *, factory: Callable[[], Any] | None = None,
            parse: Callable[[str], Any] = str):
    """A Settings field read from ``env`` (when set and not empty) through ``parse``."""
    meta = {"env": env, "parse": parse} if env else {}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def parse_bytes(raw: str) -> int:
    """A size in bytes, as a number or a Kubernetes quantity ("500Mi", "20Gi")."""
    return int(parse_quantity(raw, "size"))


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def env_json_strings(name: str, kind: type[dict] | type[list]):
    """A JSON object of strings (``kind=dict``) or list of strings (``kind=list``) from ``name``; empty when unset."""
    raw = os.environ.get(name) or ("{}" if kind is dict else "[]")
    what = "object of strings" if kind is dict else "list of strings"
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    items = value.values() if isinstance(value, dict) else value
    if not isinstance(value, kind) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{name} must be a JSON {what}, got {raw!r}")
    return value


def _insecure_registries(raw: str, registry: str) -> tuple[str, ...]:
    """OPBOX_REGISTRY_INSECURE: "1"/"true" means the host of OPBOX_REGISTRY; else a comma-separated list of hosts."""
    raw = raw.strip()
    if raw.lower() in ("", "0", "false", "no"):
        return ()
    if raw.lower() in ("1", "true", "yes"):
        return (registry.split("/", 1)[0],)
    return tuple(host.strip() for host in raw.split(",") if host.strip())


@dataclass(frozen=True)
class Settings:
    home: Path = setting(factory=opbox_home)  # OPBOX_HOME (read by opbox_home)
    host: str = setting("OPBOX_HOST", "127.0.0.1")
    port: int = setting("OPBOX_PORT", 8000, parse=int)
    public_url: str | None = setting("OPBOX_PUBLIC_URL")  # how clients reach the gateway; default http://host:port
    backend: str = setting("OPBOX_BACKEND", "local")
    isolation: str = setting("OPBOX_ISOLATION", "worker")  # local backend: "worker" (warm pools) or "run"
    # local backend: seal user code in a bubblewrap sandbox as its workspace's uid: "auto" (when the platform
    # runs as root with bwrap; else a warning), "required" (refuse to start without), "off"
    sandbox: str = setting("OPBOX_SANDBOX", "auto")
    store_url: str | None = setting("OPBOX_STORE_URL")  # default: a folder in home
    # the records: postgresql://... for several gateways on one PostgreSQL; unset: the SQLite file home/state.db
    database_url: str | None = setting("OPBOX_DATABASE_URL")
    workspace: str | None = setting("OPBOX_WORKSPACE")  # bootstrap workspace
    token: str | None = setting("OPBOX_TOKEN")  # bootstrap token
    max_workers: int = setting("OPBOX_MAX_WORKERS", factory=lambda: max(2, os.cpu_count() or 2), parse=int)
    # runs at once on this machine (warm workers' leases), shared evenly by the workspaces that have work
    max_running: int = setting("OPBOX_MAX_RUNNING", factory=lambda: max(2, os.cpu_count() or 2), parse=int)
    worker_idle: float = setting("OPBOX_WORKER_IDLE", 60.0, parse=float)
    # while a pool's queue outnumbers its busy workers, a warm worker takes queued runs in groups of as many as its
    # recent runs take this many seconds together (at most 32); 0: one run at a time
    group_span: float = setting("OPBOX_GROUP_SPAN", 0.25, parse=float)
    pool_idle: float = setting("OPBOX_POOL_IDLE", 900.0, parse=float)
    max_upload: int = setting("OPBOX_MAX_UPLOAD", 200 * 1024**2, parse=int)
    max_request_body: int = setting("OPBOX_MAX_REQUEST_BODY", 80 * 1024**2, parse=int)
    # the largest argument, result or item (large ones go straight to the object store, not through the gateway)
    max_payload: int = setting("OPBOX_MAX_PAYLOAD", 1024**3, parse=int)
    max_log_bytes: int = setting("OPBOX_MAX_LOG_BYTES", 8 * 1024**2, parse=int)
    # arguments and results above this many bytes are kept in the object store, not in the state file
    payload_inline: int = setting("OPBOX_PAYLOAD_INLINE", 1024**2, parse=int)
    # per workspace: bytes of arguments, results, logs and code it may store ("50Gi"); unset: no quota
    storage_quota: int | None = setting("OPBOX_STORAGE_QUOTA", parse=parse_bytes)
    max_open_runs: int = setting("OPBOX_MAX_OPEN_RUNS", 100_000, parse=int)  # per workspace: queued + running
    cancel_grace: float = setting(default=5.0)
    # retention: finished runs' arguments, results and logs are dropped after this many days (a job may set its
    # own: @operator(retention_days=...)), their records after the second; unused uploads, code folders and
    # environments go once older than gc_min_age seconds; the collector runs every gc_interval seconds
    retention_days: float = setting("OPBOX_RETENTION_DAYS", 7.0, parse=float)
    retention_run_days: float = setting("OPBOX_RETENTION_RUN_DAYS", 90.0, parse=float)
    gc_min_age: float = setting("OPBOX_GC_MIN_AGE", 3600.0, parse=float)
    gc_interval: float = setting("OPBOX_GC_INTERVAL", 3600.0, parse=float)
    # requests a second per bearer token on average, and the burst allowed above it (then 429 + Retry-After)
    rate_limit: float = setting("OPBOX_RATE_LIMIT", 1000.0, parse=float)
    rate_burst: float = setting("OPBOX_RATE_BURST", 2000.0, parse=float)
    # SIGTERM/SIGINT: seconds the gateway waits for runs in its workers' hands to hand their results in
    shutdown_grace: float = setting("OPBOX_SHUTDOWN_GRACE", 10.0, parse=float)
    builder: str | None = setting("OPBOX_BUILDER")  # local (a virtualenv), podman, buildkit or kaniko; default: the backend's
    base_image: str | None = setting("OPBOX_BASE_IMAGE")  # image builders: the image job images start from
    registry: str = setting("OPBOX_REGISTRY", "localhost")  # image builders' tag prefix: registry.example.com/opbox
    wheelhouse: Path | None = setting("OPBOX_WHEELHOUSE", parse=Path)  # the wheel cache; default home/wheelhouse
    registry_auth_file: Path | None = setting("OPBOX_REGISTRY_AUTH_FILE", parse=Path)  # docker config.json
    registry_insecure: tuple[str, ...] = ()  # registry hosts reached over plain HTTP (OPBOX_REGISTRY_INSECURE)
    # the key that encrypts workspace secrets; a file apart from the state file (default home/secrets.key)
    secrets_key_file: Path | None = setting("OPBOX_SECRETS_KEY_FILE", parse=Path)
    # the platform's secret (signs runs' tokens, upload URLs, dashboard sessions): a file of 64 hex digits; default
    # home/secret, made at first start. Several gateways on one database must share it (a Kubernetes Secret)
    secret_file: Path | None = setting("OPBOX_SECRET_FILE", parse=Path)
    s3_endpoint_url: str | None = setting("OPBOX_S3_ENDPOINT_URL")  # S3-compatible server, if the store URL names none
    # the S3 endpoint the signed URLs handed to clients and runtimes name, when they reach S3 at another address
    # than the gateway does (the store URL's public_endpoint= wins)
    s3_public_endpoint: str | None = setting("OPBOX_S3_PUBLIC_ENDPOINT")
    # Prometheus metrics: GET /metrics on the gateway with this bearer token, and/or on their own port (no
    # token; bind it where only the scraper reaches); with neither, /metrics answers 404
    metrics_token: str | None = setting("OPBOX_METRICS_TOKEN")
    metrics_port: int | None = setting("OPBOX_METRICS_PORT", parse=int)
    # the dashboard's browser sessions (a signed, HttpOnly cookie) last this many seconds
    session_ttl: float = setting("OPBOX_SESSION_TTL", 8 * 3600.0, parse=float)

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        values = {}
        for f in fields(cls):
            name = f.metadata.get("env")
            raw = os.environ.get(name) if name else None
            if raw:
                values[f.name] = _parse(name, raw, f.metadata["parse"])
        registry = values.get("registry", cls.registry)
        values["registry_insecure"] = _insecure_registries(os.environ.get("OPBOX_REGISTRY_INSECURE", ""), registry)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


def _parse(name: str, raw: str, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(raw)
    except ValueError:
        what = {int: "a whole number", float: "a number", parse_bytes: "a size such as 20Gi"}.get(parse, "valid")
        raise ConfigError(f"{name} must be {what}, got {raw!r}") from None
