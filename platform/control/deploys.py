"""Deploying: code uploads, jobs and their versions, and handing versions to the builder.

Code zips are content-addressed in the object store (``{workspace}/code/{sha256}.zip``),
so uploading the same folder twice is skipped. Each deploy makes a new version of the job;
the builder turns it into something the backend can run, and its output reaches the caller
line by line.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from typing import Callable

from opbox.builder.base import BuildSpec
from opbox.errors import BuildError, Conflict, NotFound, OpboxError, PayloadTooLarge, ValidationError
from opbox.image import Image
from opbox.resource import Resource
from opbox.schedules import from_dict as schedule_from

from ..backends.base import ChecksResources, InjectsSecrets, VersionInfo, require, supports
from ..ids import check_name
from ..records.base import OPEN, JobRecord, NewVersion, Records, VersionRecord
from . import signature as signatures
from .runs import Runs

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ENTRY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$")
_PYTHON = re.compile(r"^3\.[0-9]{1,2}$")
KINDS = ("function", "class", "asgi")
MAX_BUILD_LOG = 256 * 1024


def code_key(workspace: str, sha256: str) -> str:
    return f"{workspace}/code/{sha256}.zip"


class Deploys:
    """``check_secrets(workspace, names)`` raises MissingSecret; ``on_ready(workspace, job, spec)`` hooks run
    when a version is ready (the composition root sets the job's schedule there)."""

    def __init__(self, records: Records, store, builder, runs: Runs, max_upload: int,
                 check_secrets: Callable[[str, tuple], None] = lambda workspace, names: None):
        self.records = records
        self.store = store
        self.builder = builder
        self.runs = runs
        self.max_upload = max_upload
        self.check_secrets = check_secrets
        self.on_ready: list[Callable[[str, JobRecord, dict], None]] = []

    async def upload_slot(self, workspace: str, sha256: str, size: int) -> dict:
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise ValidationError("sha256 must be 64 lowercase hex digits")
        if not isinstance(size, int) or size <= 0:
            raise ValidationError("size must be a whole number of bytes > 0")
        if size > self.max_upload:
            raise PayloadTooLarge(f"the code archive is {size} bytes; the upload limit is {self.max_upload}")
        key = code_key(workspace, sha256)
        if await asyncio.to_thread(self.store.exists, key):
            return {"key": key, "exists": True}
        self.runs.check_quota(workspace, size)
        signed = self.store.upload_url(key, expires=900, max_size=size, sha256=sha256)  # other bytes: refused
        return {"key": key, "exists": False, "upload": {"url": signed.url, "method": signed.method,
                                                        "headers": dict(signed.headers)}}

    def check_wanted(self, resource: Resource | dict | None, image: Image | dict | None) -> list[str]:
        """Whether the backend and builder can honour a deploy's resource and image: raises ValidationError saying
        what to do, or returns warnings (a GPU job allowed to fall back to the CPU)."""
        if not isinstance(resource, Resource):
            resource = Resource.from_dict(resource)
        if image is not None and not isinstance(image, Image):
            image = Image.from_dict(image)
        if image is not None:
            self.builder.check_image(image)
        backend = self.runs.backend
        return backend.check_resource(resource) if supports(backend, ChecksResources) else []

    def parse_spec(self, workspace: str, body: dict) -> dict:
        if not isinstance(body, dict):
            raise ValidationError("expected a JSON object")
        name = check_name(body.get("name"), "job name")
        kind = body.get("kind", "function")
        if kind not in KINDS:
            raise ValidationError(f"kind must be one of {KINDS}, got {kind!r}")
        entry = body.get("entry")
        if not isinstance(entry, str) or not _ENTRY.fullmatch(entry):
            raise ValidationError("entry must look like 'module:qualname', e.g. 'main:foo'")
        sha = body.get("code_sha256")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ValidationError("code_sha256 must be 64 lowercase hex digits")
        python = body.get("python")
        if not isinstance(python, str) or not _PYTHON.fullmatch(python):
            raise ValidationError("python must be a minor version such as '3.11'")
        cloudpickle = body.get("cloudpickle", "")
        if not isinstance(cloudpickle, str) or len(cloudpickle) > 32:
            raise ValidationError("cloudpickle must be a version string")
        resource = Resource.from_dict(body.get("resource"))
        image = Image.from_dict(body.get("image"))
        warnings = self.check_wanted(resource, image)
        if resource.secrets:
            require(self.runs.backend, InjectsSecrets)  # 501 rather than runs without their secrets
            self.check_secrets(workspace, resource.secrets)
        schedule = schedule_from(body["schedule"]) if body.get("schedule") is not None else None
        if schedule is not None and kind != "function":
            raise ValidationError("only functions can have a schedule")
        return {"name": name, "kind": kind, "entry": entry, "code_sha256": sha, "python": python,
                "cloudpickle": cloudpickle, "resource": resource, "schedule": schedule, "image": image,
                "warnings": warnings,
                "signature": signatures.parse(body.get("signature"))}

    # -- reading -------------------------------------------------------------------
    def jobs(self, workspace: str) -> list[JobRecord]:
        """The workspace's jobs, newest first."""
        return self.records.jobs.in_workspace(workspace)

    def job(self, workspace: str, ref: str) -> JobRecord:
        """A job by id or name; NotFound otherwise."""
        job = self.records.jobs.get(workspace, ref)
        if job is None:
            raise NotFound(f"no job {ref!r} in workspace {workspace}")
        return job

    async def delete_job(self, workspace: str, ref: str) -> dict:
        """Delete a job with its versions, runs (arguments, results, logs, items, attempts), maps and schedule.
        Refused (409) while
        it has runs queued or running, a map in flight, a version building, or a service serving it: nothing
        in flight breaks. Its code archive and environments go with the next retention pass once nothing uses them."""
        job = self.job(workspace, ref)
        busy = [status for status in OPEN if self.records.runs.of_job(job.id, status, None, 1)]
        if busy:
            raise Conflict(f"job {job.name!r} has runs {' and '.join(busy)}: cancel them (opbox cancel RUN) or let "
                           "them end, then delete it", open=busy)
        maps = sorted(b for b, state in self.runs.batches.items() if state.version.job_id == job.id)
        if maps:
            raise Conflict(f"job {job.name!r} has maps in flight ({', '.join(maps)}): let them end or cancel them "
                           "(opbox cancel --batch BATCH), then delete it", maps=maps)
        if any(v.status == "building" for v in self.versions(job)):
            raise Conflict(f"job {job.name!r} has a version building: delete it once the build has ended")
        serving = sorted(s.name for s in self.records.services.in_workspace(workspace) if s.job_id == job.id)
        if serving:
            raise Conflict(f"job {job.name!r} is served as {', '.join(serving)}: delete the service first "
                           "(opbox services delete NAME)", services=serving)
        dropped = self.records.jobs.delete(job.id)
        await asyncio.to_thread(lambda: [self.store.delete(key) for key in dropped.object_keys])
        return {"deleted": job.id, "name": job.name, "runs": dropped.runs, "bytes": dropped.bytes}

    def versions(self, job: JobRecord) -> list[VersionRecord]:
        """The job's versions, newest first."""
        return self.records.jobs.versions(job.id)

    def build_log(self, job: JobRecord, version: int) -> str:
        log = self.records.jobs.build_log(job.id, version)
        if log is None:
            raise NotFound(f"job {job.name} has no version {version}")
        return log

    # -- deploying -----------------------------------------------------------------
    def _new_version(self, workspace: str, spec: dict) -> tuple[JobRecord, int]:
        version = NewVersion(entry=spec["entry"], code_key=code_key(workspace, spec["code_sha256"]),
                             code_sha256=spec["code_sha256"], python=spec["python"], cloudpickle=spec["cloudpickle"],
                             resource=spec["resource"].to_dict(), created_at=time.time(),
                             signature=spec.get("signature"))
        return self.records.jobs.add_version(workspace, spec["name"], spec["kind"], version)

    async def load_code(self, workspace: str, sha256: str) -> bytes:
        """The uploaded archive, checked against its hash (before any version is made)."""
        key = code_key(workspace, sha256)
        size = await asyncio.to_thread(self.store.size, key)
        if size is not None and size > self.max_upload:  # S3 presigned PUTs cannot cap the size themselves
            await asyncio.to_thread(self.store.delete, key)
            raise PayloadTooLarge(f"the uploaded code is {size} bytes; the upload limit is {self.max_upload}")
        try:
            zip_bytes = await asyncio.to_thread(self.store.get, key)
        except NotFound:
            raise NotFound(f"no uploaded code with sha256 {sha256}; upload it first") from None
        if hashlib.sha256(zip_bytes).hexdigest() != sha256:
            # a store that does not check the signed digest kept other bytes: drop them, or the
            # next deploy would be told "exists" and fail the same way forever
            await asyncio.to_thread(self.store.delete, key)
            raise ValidationError("the uploaded code does not match its sha256; it was discarded: deploy again")
        return zip_bytes

    def recover(self) -> int:
        """After a restart: a build the platform was running when it stopped will never finish. Its version
        fails with the reason (the build's processes died with the gateway) instead of staying ``building``."""
        return self.records.jobs.fail_unfinished_builds(
            "the platform stopped while this version was building; deploy again")

    async def deploy(self, workspace: str, spec: dict, zip_bytes: bytes,
                     log: Callable[[str], None]) -> tuple[JobRecord, int]:
        """Make and build a new version; returns the job and its new version. Raises BuildError."""
        if not self.records.jobs.code_in_use(code_key(workspace, spec["code_sha256"])):
            self.records.usage.add(workspace, len(zip_bytes))  # an archive counts once, from its first version
        job, version = self._new_version(workspace, spec)
        lines: list[str] = []

        def emit(line: str) -> None:
            lines.append(line)
            log(line)

        emit(f"building {job.name} version {version}")
        for warning in spec.get("warnings") or ():
            emit(f"warning: {warning}")
        build = BuildSpec(workspace=workspace, job_name=job.name, version=version, code_sha256=spec["code_sha256"],
                          python=spec["python"], entry=spec["entry"], image=spec.get("image"))
        try:
            artifact = await self.builder.build(build, zip_bytes, emit)
        except Exception as exc:
            error = exc if isinstance(exc, OpboxError) else BuildError(f"build failed: {type(exc).__name__}: {exc}")
            text = "\n".join(lines + ([error.log] if isinstance(error, BuildError) and error.log else []))
            self.records.jobs.version_failed(job.id, version, str(error.message), text[-MAX_BUILD_LOG:])
            if isinstance(error, BuildError):
                error.log = text[-MAX_BUILD_LOG:]
            raise error from exc
        self.records.jobs.version_ready(job.id, version, artifact.to_dict(), artifact.requirements_sha256 or "",
                                        "\n".join(lines)[-MAX_BUILD_LOG:], time.time())
        info = self.runs.version_info(job.id, version)
        await self.runs.backend.prepare(info)
        job = self.job(workspace, job.id)
        for hook in self.on_ready:
            hook(workspace, job, spec)
        return job, version

    def check_json_call(self, version: VersionInfo, args: list | None, kwargs: dict | None) -> None:
        """422 naming the function's signature when JSON arguments do not fit it (versions deployed with one)."""
        row = self.records.jobs.version(version.job_id, version.version)
        if row is not None and row.signature:
            signatures.check(row.signature, args or [], kwargs or {})

    def resolve(self, workspace: str, ref: str, version: int | None = None) -> tuple[JobRecord, VersionInfo]:
        """A job (by id or name) and the version to run: the given one or the latest ready one."""
        job = self.job(workspace, ref)
        if version is None:
            version = job.latest_version
            if version is None:
                raise Conflict(f"job {job.name!r} has no ready version yet")
        return job, self.runs.version_info(job.id, version)
