"""Services: classes (and ASGI apps) deployed as HTTP endpoints, their records and their lifecycle.

A service is a name in a workspace pointing at a job version of kind ``class`` or ``asgi``,
with the constructor's arguments (an args envelope, stored as bytes and never decoded here)
and its scaling settings. The backend runs the replicas (``Backend.deploy_service``); this
module keeps their records and redeploys them after a restart. Calls do not pass here: the
serving proxy (``platform/proxy/proxy.py``) asks for a service's kind and ready replicas and
does the rest.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from typing import Callable

from opbox import defaults, envelope
from opbox.errors import ClusterRefused, NotFound, NotSupported, PayloadTooLarge, ServiceFailed, ValidationError

from ..backends.base import ServiceInfo, ServiceLogs, Serving, require, supports
from ..ids import check_name
from ..records.base import Records, ServiceRecord

log = logging.getLogger("opbox.services")

SERVABLE = ("class", "asgi")
SERVICE_CHANGED = "service:"  # the notice to the other gateways that a service was deployed again
LIMITS = {"replicas": (1, 64), "concurrency": (0, 10_000), "queue": (0, 100_000)}
DEFAULTS = defaults.SERVICE  # the same as the SDK's and the runtime's


class Services:
    def __init__(self, records: Records, backend, deploys, max_payload: int, base_url=lambda: "",
                 on_delete=lambda workspace, name: None):
        self.records = records
        self.on_delete = on_delete  # the service's caller token goes (Auth)
        self.backend = backend
        self.deploys = deploys
        self.max_payload = max_payload
        self.base_url = base_url
        self.kinds: dict[str, str] = {}
        # several gateways on one database: a service changed here is told to the others (``core`` sets it);
        # with replicas of each gateway's own (local, container), each serves it from its record
        self.publish: Callable[[str], None] | None = None

    @property
    def supported(self) -> bool:
        return supports(self.backend, Serving)

    def _check_supported(self) -> None:
        require(self.backend, Serving)  # NotSupported (501) names the backend

    async def start(self) -> None:
        if not self.supported:
            return
        for row in self.records.services.all():
            try:
                await self.backend.deploy_service(self._info(row), 0)
                self.kinds[f"{row.workspace}/{row.name}"] = row.kind
            except Exception as exc:  # a version gone or broken: the record stays, calls say why
                log.error("could not restore service %s/%s: %s", row.workspace, row.name, exc)

    # -- records ---------------------------------------------------------------------------
    def _row(self, workspace: str, name: str) -> ServiceRecord:
        row = self.records.services.get(workspace, name)
        if row is None:
            raise NotFound(f"no service {name!r} in workspace {workspace}")
        return row

    def _info(self, row: ServiceRecord) -> ServiceInfo:
        version = self.deploys.runs.version_info(row.job_id, row.version)
        return ServiceInfo(workspace=row.workspace, name=row.name, version=version, init=row.init,
                           replicas=row.replicas, concurrency=row.concurrency, queue=row.queue,
                           scale_to_zero=row.scale_to_zero)

    def parse(self, workspace: str, name: str, body: dict) -> dict:
        check_name(name, "service name")
        job_ref = body.get("job") or name
        if not isinstance(job_ref, str):
            raise ValidationError("job must be a job id or name")
        version = body.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
            raise ValidationError(f"version must be a whole number >= 1, got {version!r}")
        job, info = self.deploys.resolve(workspace, job_ref, version)
        if job.kind not in SERVABLE:
            raise ValidationError(f"job {job.name!r} is a {job.kind}: call it as a job; only classes "
                                  "(@operator() on a class) and ASGI apps are served")
        row = {"workspace": workspace, "name": name, "job_id": job.id, "version": info.version, "kind": job.kind}
        for key, (low, high) in LIMITS.items():
            value = body.get(key, DEFAULTS[key])
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValidationError(f"{key} must be a whole number from {low} to {high}, got {value!r}")
            row[key] = value
        idle = body.get("scale_to_zero", DEFAULTS["scale_to_zero"])
        if idle is not None and (not isinstance(idle, (int, float)) or isinstance(idle, bool) or idle <= 0):
            raise ValidationError(f"scale_to_zero must be a number of seconds > 0 or null (never), got {idle!r}")
        row["scale_to_zero"] = None if idle is None else float(idle)
        raw = body.get("init") or ""
        try:
            init = base64.b64decode(raw, validate=True) if raw else b""
        except (binascii.Error, TypeError):
            raise ValidationError("init must be a base64 args envelope") from None
        if len(init) > self.max_payload:
            raise PayloadTooLarge(f"init arguments are {len(init)} bytes; the limit is {self.max_payload}")
        if init and envelope.read_header(init)["kind"] != envelope.ARGS:
            raise ValidationError("init must be an args envelope")
        if init and job.kind == "asgi":
            raise ValidationError("an ASGI app takes no init arguments")
        row["init"] = init
        return row

    async def put(self, workspace: str, name: str, body: dict, wait: float) -> dict:
        """Create or redeploy a service; waits up to ``wait`` s for the new version to be ready."""
        self._check_supported()
        spec = self.parse(workspace, name, body)
        now = time.time()
        old = self.records.services.get(workspace, name)
        row = ServiceRecord(**spec, created_at=old.created_at if old else now, updated_at=now)
        self.records.services.put(row)
        self.kinds[f"{workspace}/{name}"] = row.kind
        try:
            await self.backend.deploy_service(self._info(row), wait)
        except (ValidationError, ClusterRefused):  # refused before anything started: the record stays as it was
            if old is None:
                self.records.services.delete(workspace, name)
                self.kinds.pop(f"{workspace}/{name}", None)
            else:
                self.records.services.put(old)
                self.kinds[f"{workspace}/{name}"] = old.kind
            raise
        except ServiceFailed:
            if old is not None and self.backend.service_status(f"{workspace}/{name}")["status"] != "failed":
                self.records.services.put(old)  # the old version goes on serving: the record (and a restart) say so
                self.kinds[f"{workspace}/{name}"] = old.kind
            raise
        if self.publish is not None:
            self.publish(f"{SERVICE_CHANGED}{workspace}/{name}")
        return self.get(workspace, name)

    def get(self, workspace: str, name: str) -> dict:
        return self._json(self._row(workspace, name))

    def init_args(self, workspace: str, name: str) -> bytes:
        """The constructor's arguments a service's replicas start with (an args envelope, as stored)."""
        return self._row(workspace, name).init

    def _json(self, row: ServiceRecord) -> dict:
        out = {"name": row.name, "kind": row.kind, "job_id": row.job_id, "version": row.version,
               "replicas": row.replicas, "concurrency": row.concurrency, "queue": row.queue,
               "scale_to_zero": row.scale_to_zero, "created_at": row.created_at, "updated_at": row.updated_at}
        out["url"] = f"{self.base_url()}/{row.workspace}/serve/{row.name}"
        try:
            out.update(require(self.backend, Serving).service_status(f"{row.workspace}/{row.name}"))
        except (NotFound, NotSupported):
            out.update(status="unknown")
        return out

    def list(self, workspace: str) -> list[dict]:
        return [self._json(r) for r in self.records.services.in_workspace(workspace)]

    async def delete(self, workspace: str, name: str) -> None:
        self._row(workspace, name)
        self._check_supported()
        self.records.services.delete(workspace, name)
        self.on_delete(workspace, name)
        self.kinds.pop(f"{workspace}/{name}", None)
        try:
            await self.backend.delete_service(f"{workspace}/{name}")
        except NotFound:
            pass

    async def logs(self, workspace: str, name: str, limit: int) -> str:
        self._row(workspace, name)
        return await require(self.backend, ServiceLogs).service_logs(f"{workspace}/{name}", limit)

    # -- what the serving proxy asks, on every call: from memory once known -------------------
    def kind(self, workspace: str, name: str) -> str:
        """``class`` or ``asgi``; NotFound for an unknown service."""
        key = f"{workspace}/{name}"
        kind = self.kinds.get(key)
        if kind is None:
            kind = self.kinds[key] = self._row(workspace, name).kind
        return kind

    async def endpoints(self, workspace: str, name: str, wait: float) -> list[str]:
        """Base URLs of the service's ready replicas, from the backend. Counts as activity: a service
        scaled to zero starts again and this waits up to ``wait`` s for it ([] if still not ready)."""
        self._check_supported()
        key = f"{workspace}/{name}"
        if key not in self.kinds:
            self.kind(workspace, name)  # NotFound for unknown services
        try:
            return await self.backend.service_endpoints(key, wait)
        except NotFound:
            if not self._own_replicas:
                raise
            # deployed through another gateway: this one serves it too, from its record (NotFound if none)
            await self.backend.deploy_service(self._info(self._row(workspace, name)), 0)
            return await self.backend.service_endpoints(key, wait)

    @property
    def _own_replicas(self) -> bool:
        """Several gateways share the records and each runs replicas of its own (not one cluster's Services)."""
        return self.records.leadership.shared and getattr(self.backend, "replicas_per_gateway", False)

    async def follow(self, workspace: str, name: str) -> None:
        """The service changed on another gateway: if this one serves it, it serves what the record says now
        (the new version, or nothing once deleted); one that does not starts it at its first call here."""
        key = f"{workspace}/{name}"
        if not self._own_replicas:
            return
        try:
            self.backend.service_status(key)
        except NotFound:
            return
        row = self.records.services.get(workspace, name)
        try:
            if row is None:
                self.kinds.pop(key, None)
                await self.backend.delete_service(key)
            else:
                self.kinds[key] = row.kind
                await self.backend.deploy_service(self._info(row), 0)
        except Exception:  # its next call here says what is wrong
            log.exception("following service %s changed on another gateway failed", key)
