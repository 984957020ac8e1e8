"""``@operator()``: mark a function as deployable. Called locally, it is the same function."""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path

from typing import TYPE_CHECKING

from .errors import BuildError, ConfigError, OpboxError, ValidationError, from_response
from .image import Image
from .progress import BuildOutput
from .project import source_of
from .resource import Resource
from .retries import Retries
from .schedules import Schedule, from_dict as schedule_from

if TYPE_CHECKING:  # the SDK's HTTP side is imported on use: the runtime imports this module too
    from .client import Client
    from .remote import RemoteFunction


def operator(name: str | None = None, resource: Resource | None = None, *, timeout: float | None = None,
             max_retries: int | None = None, retention_days: float | None = None, retries: Retries | None = None,
             secrets: list[str] | tuple[str, ...] | None = None, schedule: Schedule | None = None,
             image: Image | None = None):
    """Decorate a function to make it deployable with ``.deploy()``.

    ``resource`` asks for compute (``Resource(cpu="1", memory="2Gi", ...)``); ``timeout``
    (seconds) and ``max_retries`` apply to each run (``retries=Retries(...)``: with backoff);
    ``retention_days`` keeps finished runs' arguments, results and logs that long (default: the
    platform's); ``secrets`` names workspace secrets given to runs as environment variables;
    ``schedule`` (``Cron(...)`` or ``Period(...)``) makes the platform run the job by itself once
    deployed; ``image`` (``Image(base=..., apt=[...], pip=[...], run=[...])``) what the job's container
    image is made of (the local backend takes its ``pip`` only). All are checked here.
    """
    if resource is not None and not isinstance(resource, Resource):
        raise ValidationError(f"resource must be an opbox.Resource, got {type(resource).__name__}")
    if image is not None and not isinstance(image, Image):
        raise ValidationError(f"image must be an opbox.Image, got {type(image).__name__}")
    spec = (resource or Resource()).merge(timeout=timeout, max_retries=max_retries, retention_days=retention_days,
                                          retries=retries, secrets=secrets)
    if schedule is not None:
        schedule = schedule_from(schedule)

    def wrap(obj):
        if inspect.isclass(obj):
            from .serving import make_servable

            return make_servable(obj, name=name, resource=spec, image=image)
        if not callable(obj):
            raise ValidationError(f"@operator() decorates a function, got {type(obj).__name__}")
        return Operator(obj, name=name, resource=spec, schedule=schedule, image=image)

    return wrap


class Operator:
    """A deployable function. ``Operator.from_job(ref)`` gives the remote handle of a deployed one."""

    def __init__(self, fn, *, name: str | None = None, resource: Resource | None = None,
                 schedule: Schedule | None = None, image: Image | None = None):
        functools.update_wrapper(self, fn)
        self.__opbox_target__ = fn  # what the runtime calls
        self.fn = fn
        self.name = name or fn.__name__
        self.resource = resource or Resource()
        self.schedule = schedule
        self.image = image

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<opbox operator {self.name!r} of {self.fn!r}>"

    @classmethod
    def from_serving(cls, name: str, client: "Client | None" = None):
        """The handle of a deployed service (a class or an ASGI app): ``Operator.from_serving("Model").predict(x)``."""
        from .serving import RemoteService

        return RemoteService(name, client)

    @classmethod
    def from_job(cls, ref: str, version: int | None = None, client: "Client | None" = None) -> "RemoteFunction":
        """The remote handle of a deployed job, by id or name (``version``: pin one; default the latest)."""
        from .client import default_client
        from .remote import RemoteFunction

        client = client or default_client()
        job = client.get(f"/job/{ref}").json()
        return RemoteFunction(job["id"], job["name"], version, client)

    def deploy(self, *, name: str | None = None, resource: Resource | None = None, timeout: float | None = None,
               max_retries: int | None = None, client: "Client | None" = None, quiet: bool = False,
               root: str | os.PathLike | None = None) -> "RemoteFunction":
        """Pack the function's project, upload it, build it: a new version of the job.

        The folder packed is the file's own for a single file; for a module of a package, the nearest folder
        up holding pyproject.toml, setup.cfg, .git or requirements.txt; ``root`` names it instead.

        Build output goes to stderr (unless ``quiet``). Returns the remote handle, pinned to
        the new version. A failed build raises ``BuildError`` with the build log.
        """
        if os.environ.get("OPBOX_RUNTIME") == "1":
            raise ConfigError(
                f"{self.name}.deploy() was called while the opbox runtime imported your module; put deploy "
                "calls under `if __name__ == \"__main__\":` so that importing the module does not deploy")
        from .client import default_client

        spec = (resource or self.resource).merge(timeout=timeout, max_retries=max_retries)
        return deploy_function(self.fn, name or self.name, spec, client or default_client(), quiet, self.schedule,
                               image=self.image, root=root)


def deploy_function(fn, name: str, resource: Resource, client: "Client", quiet: bool,
                    schedule: Schedule | None = None, *, image: Image | None = None,
                    root: str | os.PathLike | None = None) -> "RemoteFunction":
    from .remote import RemoteFunction

    from .runtime.schema import call_schema  # the runtime's reading of a signature (stdlib only)

    folder, entry = source_of(fn, root)
    job, version = build_version(folder, entry, name, "function", resource, client, quiet, schedule, call_schema(fn),
                                 image=image)
    return RemoteFunction(job["id"], job["name"], version, client)


def build_version(folder: Path, entry: str, name: str, kind: str, resource: Resource, client: "Client",
                  quiet: bool, schedule: Schedule | None = None, signature: dict | None = None, *,
                  image: Image | None = None) -> tuple[dict, int]:
    """Pack ``folder``, upload it and build a new version of job ``name``: (job, version); with ``schedule``,
    the platform sets the job's schedule once the version is ready. ``signature``: the function's parameters,
    which the platform checks JSON triggers against. The platform checks ``resource`` and ``image`` against its
    backend and builder before the code is sent (a GPU it has not, apt packages on the local backend)."""
    from . import serialization
    from .packaging import pack_folder

    wanted = {"resource": resource.to_dict(), **({"image": image.to_dict()} if image is not None else {})}
    packed = pack_folder(folder)
    slot = client.post("/uploads", json={"sha256": packed.sha256, "size": len(packed.data), **wanted}).json()
    if not slot["exists"]:
        upload = slot["upload"]
        resp = client.http.request(upload["method"], upload["url"], content=packed.data, headers=upload["headers"],
                                   timeout=300)
        if resp.status_code >= 300:
            try:
                raise from_response(resp.status_code, resp.json())
            except ValueError:
                raise OpboxError(f"upload failed with HTTP {resp.status_code}: {resp.text[:300]}") from None
    body = {"name": name, "kind": kind, "entry": entry, "code_sha256": packed.sha256,
            "python": serialization.PYTHON, "cloudpickle": serialization.cloudpickle_version(),
            **wanted, **({"signature": signature} if signature else {})}
    if schedule is not None:
        body["schedule"] = schedule.to_dict()
    with BuildOutput(name, quiet) as output:
        for line in client.stream_lines("POST", "/jobs", json=body, timeout=None):
            if "log" in line:
                output.line(line["log"])
            elif "error" in line:
                error = line["error"]
                details = dict(error.get("details") or {})
                if error.get("error") == BuildError.code:
                    raise BuildError(error.get("message", "build failed"), log=details.pop("log", ""))
                raise from_response(error.get("status", 422) if isinstance(error.get("status"), int) else 422, error)
            elif line.get("done"):
                return line["job"], line["version"]
    raise OpboxError("the deploy stream ended without a result; see `opbox jobs` and the build log")
