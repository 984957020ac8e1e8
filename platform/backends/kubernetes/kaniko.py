"""In-cluster image builds (``OPBOX_BUILDER=kaniko``): a kaniko Job per image, pushing to the registry.

``KanikoBuilder`` is an ``ImageBuilder`` (opbox.builder.image): the container build strategy
hands it the same context folder podman would build, and it

    exists  -> asks the registry for the tag (HEAD /v2/<repo>/manifests/<tag>): a tag that is
               there is never rebuilt, whichever platform replica or cluster built it
    build   -> writes the context as a reproducible tar.gz to the S3 store, renders a batch/v1
               Job from templates/kubernetes/kaniko-job.yaml.j2 (the kaniko executor with
               ``--context=s3://...``, ``--destination=<tag>``, the layer cache in the registry),
               follows its pod: every line of kaniko's log reaches ``deploy()`` as it comes;
               then checks the registry has the tag. The context object is deleted afterwards;
               a failed Job stays for ``ttlSecondsAfterFinished`` to be looked at.

Builds run in the platform's namespace (``OPBOX_BUILD_NAMESPACE``, else
``OPBOX_SYSTEM_NAMESPACE``): the S3 credentials Secret (``opbox-s3``) is there and no user
code runs during a build (requirements come as wheels the platform resolved). Registry
credentials come from the ``opbox-registry`` dockerconfigjson Secret, mounted where kaniko
looks (``/kaniko/.docker/config.json``); it is optional, for registries that need none.

The kubernetes client is synchronous and so is this module: ``build`` runs in a thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from opbox.builder.image import write_context_archive
from opbox.builder.registry import parse_reference
from opbox.errors import BuildError, ConfigError, ValidationError
from opbox.resource import parse_quantity

from ...settings import Settings, env_int, env_json_strings
from . import render
from .config import api_client

log = logging.getLogger("opbox.kubernetes.kaniko")

DEFAULT_EXECUTOR = "gcr.io/kaniko-project/executor:v1.23.2"
# The client's Python minor version goes in for {python}; OPBOX_BASE_IMAGE overrides it.
DEFAULT_BASE_IMAGE = "docker.io/library/python:{python}-slim-bookworm"
CONTAINER = "kaniko"
# waiting reasons after which the build pod will not start by itself
_STUCK = {"ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName", "CreateContainerConfigError"}


@dataclass(frozen=True)
class KanikoSettings:
    namespace: str = "opbox-system"  # OPBOX_BUILD_NAMESPACE, else OPBOX_SYSTEM_NAMESPACE
    executor_image: str = DEFAULT_EXECUTOR  # OPBOX_KANIKO_IMAGE
    s3_secret: str | None = "opbox-s3"  # OPBOX_KANIKO_S3_SECRET ("" for none: IRSA, Workload Identity)
    s3_endpoint_url: str | None = None  # OPBOX_KANIKO_S3_ENDPOINT: default the store's endpoint
    docker_secret: str | None = "opbox-registry"  # OPBOX_KANIKO_DOCKER_SECRET ("" for none)
    service_account: str | None = None  # OPBOX_KANIKO_SERVICE_ACCOUNT
    cache: bool = True  # OPBOX_KANIKO_CACHE=0 turns the registry layer cache off
    cache_repo: str | None = None  # OPBOX_KANIKO_CACHE_REPO: default <registry>/opbox-cache
    timeout: int = 1800  # OPBOX_BUILD_TIMEOUT: seconds, the Job's activeDeadlineSeconds
    ttl_after_finished: int = 600  # OPBOX_KANIKO_TTL_AFTER_FINISHED
    cpu: str | None = None  # OPBOX_KANIKO_CPU: request
    memory: str | None = None  # OPBOX_KANIKO_MEMORY: request and limit
    extra_args: tuple[str, ...] = ()  # OPBOX_KANIKO_ARGS: JSON list of more executor flags

    @classmethod
    def from_env(cls) -> "KanikoSettings":
        env = os.environ
        extra = env_json_strings("OPBOX_KANIKO_ARGS", list)
        settings = cls(
            namespace=env.get("OPBOX_BUILD_NAMESPACE") or env.get("OPBOX_SYSTEM_NAMESPACE") or cls.namespace,
            executor_image=env.get("OPBOX_KANIKO_IMAGE") or cls.executor_image,
            s3_secret=env.get("OPBOX_KANIKO_S3_SECRET", cls.s3_secret) or None,
            s3_endpoint_url=env.get("OPBOX_KANIKO_S3_ENDPOINT") or None,
            docker_secret=env.get("OPBOX_KANIKO_DOCKER_SECRET", cls.docker_secret) or None,
            service_account=env.get("OPBOX_KANIKO_SERVICE_ACCOUNT") or None,
            cache=env.get("OPBOX_KANIKO_CACHE", "1").strip().lower() not in ("0", "false", "no", "off"),
            cache_repo=env.get("OPBOX_KANIKO_CACHE_REPO") or None,
            timeout=max(60, env_int("OPBOX_BUILD_TIMEOUT", cls.timeout)),
            ttl_after_finished=max(0, env_int("OPBOX_KANIKO_TTL_AFTER_FINISHED", cls.ttl_after_finished)),
            cpu=env.get("OPBOX_KANIKO_CPU") or None,
            memory=env.get("OPBOX_KANIKO_MEMORY") or None,
            extra_args=tuple(extra),
        )
        settings.check()
        return settings

    def check(self) -> None:
        render.check_dns_label(self.namespace, "build namespace (OPBOX_BUILD_NAMESPACE)")
        for what, name in (("OPBOX_KANIKO_S3_SECRET", self.s3_secret), ("OPBOX_KANIKO_DOCKER_SECRET",
                           self.docker_secret), ("OPBOX_KANIKO_SERVICE_ACCOUNT", self.service_account)):
            if name is not None:
                render.check_dns_subdomain(name, what)
        for what, quantity in (("OPBOX_KANIKO_CPU", self.cpu), ("OPBOX_KANIKO_MEMORY", self.memory)):
            if quantity is not None:
                try:
                    parse_quantity(quantity)
                except (ValueError, ValidationError) as exc:
                    raise ConfigError(f"{what}: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class KanikoJobSpec:
    """One build as a batch/v1 Job: what the template needs, validated."""

    name: str
    namespace: str
    executor_image: str
    context_uri: str  # s3://bucket/key.tar.gz
    destination: str  # the image tag to push
    s3_env: dict = field(default_factory=dict, hash=False)  # S3_ENDPOINT, S3_FORCE_PATH_STYLE, AWS_REGION
    s3_secret: str | None = None
    docker_secret: str | None = None
    service_account: str | None = None
    cache_repo: str | None = None
    insecure_registries: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    labels: dict = field(default_factory=dict, hash=False)
    active_deadline_seconds: int = 1800
    ttl_seconds_after_finished: int = 600
    cpu: str | None = None
    memory: str | None = None

    def __post_init__(self) -> None:
        render.check_dns_label(self.name, "build Job name")
        render.check_dns_label(self.namespace, "build namespace")
        if not self.context_uri.startswith("s3://") or any(c.isspace() for c in self.context_uri):
            raise ValidationError(f"kaniko context {self.context_uri!r}: expected an s3:// URI")
        for image in (self.executor_image, self.destination):
            if not image or any(c.isspace() for c in image):
                raise ValidationError(f"image {image!r}: expected an image reference")
        for key, value in {**self.labels, **self.s3_env}.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValidationError("labels and env must map strings to strings")

    def args(self) -> list[str]:
        args = [f"--context={self.context_uri}", "--dockerfile=Dockerfile", f"--destination={self.destination}",
                "--snapshot-mode=redo", "--compressed-caching=false", "--push-retry=3",
                f"--label=opbox.build={self.name}"]
        if self.cache_repo:
            args += ["--cache=true", f"--cache-repo={self.cache_repo}"]
        args += [f"--insecure-registry={host}" for host in self.insecure_registries]
        return args + list(self.extra_args)

    def context(self) -> dict[str, Any]:
        requests = {k: v for k, v in (("cpu", self.cpu), ("memory", self.memory)) if v}
        return {
            "name": self.name, "namespace": self.namespace, "labels": self.labels, "image": self.executor_image,
            "args": self.args(), "env": sorted(self.s3_env.items()), "s3_secret": self.s3_secret,
            "docker_secret": self.docker_secret, "service_account": self.service_account,
            "requests": requests, "limits": {"memory": self.memory} if self.memory else {},
            "active_deadline_seconds": self.active_deadline_seconds,
            "ttl_seconds_after_finished": self.ttl_seconds_after_finished,
        }


def render_kaniko_job(spec: KanikoJobSpec) -> dict:
    return render._load(render.render_text("kaniko-job.yaml.j2", **spec.context()), "kaniko-job")


def upload_context(store, context_dir: Path, key: str) -> int:
    """The build context as a tar.gz streamed to ``key`` in the store (S3: a multipart upload),
    never written to the gateway's disk: a context with CUDA wheels passes the 2 GiB ``/tmp``
    emptyDir the gateway has, whose overflow gets the pod evicted. Returns its size."""
    read_fd, write_fd = os.pipe()
    written: dict = {}

    def write() -> None:
        try:
            with os.fdopen(write_fd, "wb") as out:
                written["size"] = write_context_archive(context_dir, out)
        except BaseException as exc:  # the upload then ends early: say why, below
            written["error"] = exc

    writer = threading.Thread(target=write, name="opbox-kaniko-context", daemon=True)
    writer.start()
    try:
        with os.fdopen(read_fd, "rb") as stream:
            store.put_stream(key, stream)
    finally:
        writer.join()
    if "error" in written:  # the object is a truncated archive: it goes
        store.delete(key)
        raise BuildError(f"could not pack the build context {context_dir}: {written['error']}")
    return written["size"]


def s3_env(location: dict, endpoint_override: str | None = None) -> dict[str, str]:
    """The environment kaniko's S3 client reads to fetch ``location`` (from ``S3Store.location``)."""
    env = {"AWS_REGION": location.get("region") or "us-east-1"}
    endpoint = endpoint_override or location.get("endpoint_url")
    if endpoint:
        env["S3_ENDPOINT"] = endpoint
    if location.get("path_style"):
        env["S3_FORCE_PATH_STYLE"] = "true"
    return env


class KanikoBuilder:
    """An ``ImageBuilder`` that builds in the cluster. ``store`` must be an S3 store (kaniko
    fetches its context from S3); ``registry`` answers whether a tag exists. (buildkit.py builds on
    its way of following a build Job.)"""

    tool, container, memory_setting = "kaniko", CONTAINER, "OPBOX_KANIKO_MEMORY"

    def __init__(self, settings: KanikoSettings, *, store, registry, kube_settings, insecure_registries=(),
                 api=None, poll_timeout: int = 60):
        self.check_store(store)
        self.settings = settings
        self.store = store
        self.registry = registry
        self.insecure_registries = tuple(insecure_registries)
        self.poll_timeout = poll_timeout
        self._kube_settings = kube_settings
        self._api = api
        self._clients = None
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @staticmethod
    def check_store(store) -> None:
        """ConfigError unless build pods can fetch their context from ``store``."""
        if not hasattr(store, "location"):
            raise ConfigError("the kaniko builder fetches its build context from S3: set OPBOX_STORE_URL to an "
                              "s3:// store the cluster can reach")

    def _kube(self):
        if self._clients is None:
            from kubernetes import client

            api = self._api or api_client(self._kube_settings)
            self._clients = client.BatchV1Api(api), client.CoreV1Api(api)
        return self._clients

    def exists(self, tag: str) -> bool:
        return self.registry.exists(tag)

    def build(self, context_dir: Path, tag: str, log: Callable[[str], None]) -> str:
        with self._locks_guard:
            lock = self._locks.setdefault(tag, threading.Lock())
        with lock:  # one build per tag at a time here; the second finds it in the registry
            if self.exists(tag):
                log(f"image {tag} is in the registry: nothing to build")
                return tag
            return self._build(Path(context_dir), tag, log)

    def _build(self, context_dir: Path, tag: str, log: Callable[[str], None]) -> str:
        if not (context_dir / "Dockerfile").is_file():
            raise BuildError(f"no Dockerfile in {context_dir}")
        name = f"opbox-build-{hashlib.sha256(tag.encode()).hexdigest()[:12]}-{secrets.token_hex(3)}"
        key = f"builds/{name}.tar.gz"
        size = upload_context(self.store, context_dir, key)
        lines: list[str] = []

        def record(line: str) -> None:
            lines.append(line)
            log(line)

        try:
            location = self.store.location(key)
            registry_host = parse_reference(tag)[0]
            cache_repo = None
            if self.settings.cache:
                cache_repo = self.settings.cache_repo or f"{tag.rsplit(':', 1)[0].rsplit('/', 1)[0]}/opbox-cache"
            spec = KanikoJobSpec(
                name=name, namespace=self.settings.namespace, executor_image=self.settings.executor_image,
                context_uri=location["uri"], destination=tag,
                s3_env=s3_env(location, self.settings.s3_endpoint_url), s3_secret=self.settings.s3_secret,
                docker_secret=self.settings.docker_secret, service_account=self.settings.service_account,
                cache_repo=cache_repo,
                insecure_registries=tuple(h for h in self.insecure_registries if h == registry_host),
                extra_args=self.settings.extra_args,
                labels={"app.kubernetes.io/managed-by": "opbox", "app.kubernetes.io/component": "image-build",
                        "opbox.dev/build": name},
                active_deadline_seconds=self.settings.timeout,
                ttl_seconds_after_finished=self.settings.ttl_after_finished,
                cpu=self.settings.cpu, memory=self.settings.memory)
            batch, _ = self._kube()
            self._call(batch.create_namespaced_job, spec.namespace, render_kaniko_job(spec))
            record(f"kaniko Job {spec.namespace}/{name} building {tag} from {location['uri']} ({size:,} bytes)")
            failure = self._follow(spec, record)
        finally:
            self._forget_context(key)
        if failure:
            raise BuildError(f"building image {tag} in the cluster failed: {failure}", log="\n".join(lines) + "\n")
        self._delete_job(spec)  # a failed one stays for its TTL, to be looked at
        if not self.exists(tag):
            raise BuildError(f"the kaniko Job {spec.namespace}/{name} succeeded but the registry has no {tag}",
                             log="\n".join(lines) + "\n")
        return tag

    # -- following the build ------------------------------------------------------------
    def _follow(self, spec: KanikoJobSpec, log: Callable[[str], None]) -> str | None:
        """Wait for the build pod, stream its log, wait for the Job: None if it succeeded, else why not."""
        deadline = time.monotonic() + spec.active_deadline_seconds + 60
        pod = self._wait_for_pod(spec, deadline)
        if isinstance(pod, str):
            return pod
        self._stream_log(spec.namespace, pod, log)
        return self._wait_for_job(spec, deadline)

    def _watch(self, fn, namespace: str, selector: str, deadline: float):
        """Events (type, object dict) of a namespaced list, watched until the deadline."""
        from kubernetes import watch

        version = None
        while time.monotonic() < deadline:
            listed = self._call(fn, namespace, label_selector=selector)
            version = listed["metadata"].get("resourceVersion")
            for item in listed.get("items") or []:
                yield "SYNC", item
            timeout = max(1, min(self.poll_timeout, int(deadline - time.monotonic())))
            stream = watch.Watch().stream(fn, namespace, label_selector=selector, resource_version=version,
                                          timeout_seconds=timeout, _request_timeout=timeout + 10)
            try:
                for event in stream:
                    yield event["type"], event["raw_object"]
            except Exception as exc:  # 410 Gone, a dropped connection: list again
                log.info("watch of %s in %s ended: %s", selector, namespace, exc)

    def _wait_for_pod(self, spec: KanikoJobSpec, deadline: float) -> str | dict:
        """The build pod once its container runs or ended; a reason string if it cannot start."""
        _, core = self._kube()
        for _, pod in self._watch(core.list_namespaced_pod, spec.namespace, f"job-name={spec.name}", deadline):
            status = pod.get("status") or {}
            for container in status.get("containerStatuses") or []:
                state = container.get("state") or {}
                if "running" in state or "terminated" in state:
                    return pod
                waiting = state.get("waiting") or {}
                if waiting.get("reason") in _STUCK:
                    self._delete_job(spec)
                    return (f"the build pod {pod['metadata']['name']} cannot start: {waiting['reason']}: "
                            f"{waiting.get('message', '')}".rstrip(": "))
            if status.get("phase") in ("Succeeded", "Failed"):
                return pod
        self._delete_job(spec)
        return f"the build did not start within {spec.active_deadline_seconds} s"

    def _stream_log(self, namespace: str, pod: dict, log: Callable[[str], None]) -> None:
        _, core = self._kube()
        try:
            # read timeout: the longest silence we wait through (pushing a big layer says nothing)
            resp = core.read_namespaced_pod_log(pod["metadata"]["name"], namespace, container=self.container, follow=True,
                                                _preload_content=False, _request_timeout=(10, 900))
        except Exception as exc:
            log(f"(the build log could not be read: {exc})")
            return
        pending = b""
        try:
            for chunk in resp.stream(16 * 1024):
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    log(line.decode(errors="replace").rstrip("\r"))
        except Exception as exc:  # the Job's own status still decides how the build went
            log(f"(the build log stream broke off: {exc})")
        finally:
            resp.release_conn()
        if pending:
            log(pending.decode(errors="replace"))

    def _wait_for_job(self, spec: KanikoJobSpec, deadline: float) -> str | None:
        batch, core = self._kube()
        for kind, job in self._watch(batch.list_namespaced_job, spec.namespace, f"opbox.dev/build={spec.name}",
                                     deadline):
            if kind == "DELETED":
                return f"the build Job {spec.namespace}/{spec.name} was deleted"
            for condition in (job.get("status") or {}).get("conditions") or []:
                if condition.get("status") != "True":
                    continue
                if condition.get("type") == "Complete":
                    return None
                if condition.get("type") == "Failed":
                    return self._why_failed(spec, condition)
        self._delete_job(spec)
        return f"the build did not finish within {spec.active_deadline_seconds} s"

    def _why_failed(self, spec: KanikoJobSpec, condition: dict) -> str:
        if condition.get("reason") == "DeadlineExceeded":
            return f"it ran longer than {spec.active_deadline_seconds} s (OPBOX_BUILD_TIMEOUT)"
        _, core = self._kube()
        try:
            pods = self._call(core.list_namespaced_pod, spec.namespace, label_selector=f"job-name={spec.name}")
        except Exception:
            pods = {}
        for pod in pods.get("items") or []:
            for container in (pod.get("status") or {}).get("containerStatuses") or []:
                ended = (container.get("state") or {}).get("terminated")
                if ended:
                    if ended.get("reason") == "OOMKilled":
                        return f"{self.tool} ran out of memory (OOMKilled): raise {self.memory_setting}"
                    return f"{self.tool} exited with code {ended.get('exitCode')} (pod {pod['metadata']['name']})"
        return f"{condition.get('reason')}: {condition.get('message', '')}"

    # -- helpers ------------------------------------------------------------------------
    @staticmethod
    def _call(fn, *args, **kwargs) -> dict:
        resp = fn(*args, _preload_content=False, _request_timeout=30, **kwargs)
        return json.loads(resp.data) if resp.data else {}

    def _delete_job(self, spec: KanikoJobSpec) -> None:
        batch, _ = self._kube()
        try:
            batch.delete_namespaced_job(spec.name, spec.namespace, propagation_policy="Background",
                                        _request_timeout=30)
        except Exception as exc:
            if getattr(exc, "status", None) != 404:
                log.warning("could not delete the build Job %s/%s: %s", spec.namespace, spec.name, exc)

    def _forget_context(self, key: str) -> None:
        try:
            self.store.delete(key)
        except Exception as exc:
            log.warning("could not delete the build context %s: %s", key, exc)


def create_builder(settings: Settings, store, backend):
    """The builder registry's factory for ``OPBOX_BUILDER=kaniko``: image builds in the cluster of
    ``backend`` (the kubernetes backend: the registry allows no other), with its settings."""
    if settings.registry.split("/", 1)[0] == "localhost":
        raise ConfigError("the kaniko builder pushes images: set OPBOX_REGISTRY to a registry the cluster pulls from, "
                          "e.g. registry.example.com/opbox")
    from opbox.builder.container import ContainerBuilder
    from opbox.builder.registry import RegistryClient

    registry = RegistryClient(insecure_hosts=settings.registry_insecure, auth_file=settings.registry_auth_file)
    kaniko = KanikoBuilder(KanikoSettings.from_env(), store=store, registry=registry, kube_settings=backend.settings,
                           insecure_registries=settings.registry_insecure)
    return ContainerBuilder(settings.home, base_image=settings.base_image or DEFAULT_BASE_IMAGE,
                            registry_prefix=settings.registry, wheelhouse_dir=settings.wheelhouse,
                            image_builder=kaniko, name="kaniko")
