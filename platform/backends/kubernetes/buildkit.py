"""In-cluster image builds with rootless BuildKit (``OPBOX_BUILDER=buildkit``, what manifests/ installs;
``kaniko`` stays selectable): a Job per image, its pod holding no credential of the platform's.

    context -> the same reproducible tar.gz the kaniko builder makes, streamed to the object store,
               and handed to the build pod as a **presigned GET URL** (``ObjectStore.download_url``,
               valid for the build's timeout): BuildKit fetches a remote tarball context itself
               (``--opt context=<url>``). No S3 keys in the pod.
    push    -> a **per-build Secret** (``<job>-push``, a dockerconfigjson, mounted as the pod's
               ``$DOCKER_CONFIG/config.json``): for a registry with a token server (Docker Hub,
               GHCR, Harbor, Quay, GitLab, distribution with token auth) a bearer token the gateway
               asks for with its own credentials, scoped to ``pull,push`` of the image's repository
               and the cache repository only (``registrytoken``, which BuildKit's docker auth
               provider sends as is), for as long as the token server grants (often 5 min to 1 h:
               the push must come within it); for a registry with Basic authentication, which
               cannot scope, the platform's credentials (the build log says so). The Secret is owned
               by the Job and deleted when the build ends, however it ends.
    sandbox -> ``buildctl-daemonless.sh`` in ``moby/buildkit:*-rootless`` as uid 1000: RUN steps
               (where a requirement's ``.pth`` hook runs) get a sandbox of their own, without the
               builder's environment. Rootless BuildKit needs seccomp and AppArmor ``Unconfined``
               (to make user namespaces), which PodSecurity ``baseline`` refuses: build pods go to a
               namespace of their own (``OPBOX_BUILD_NAMESPACE``, manifests/: ``opbox-builds``,
               ``privileged`` level, nothing else runs there).

Following the Job (its pod, the log streamed into the deploy's build log, how it ended) is the
kaniko builder's (kaniko.py), as are the registry check before and after.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from opbox.builder.registry import parse_reference
from opbox.errors import BuildError, ConfigError, ValidationError
from opbox.resource import parse_quantity

from ...settings import Settings, env_int
from . import render
from .kaniko import KanikoBuilder, upload_context

log = logging.getLogger("opbox.kubernetes.buildkit")

DEFAULT_IMAGE = "docker.io/moby/buildkit:v0.18.2-rootless"
CONTAINER = "buildkit"
BUILDKIT_UID = 1000  # the rootless image's user
HOME = "/home/user"


@dataclass(frozen=True)
class BuildKitSettings:
    namespace: str = "opbox-system"  # OPBOX_BUILD_NAMESPACE, else OPBOX_SYSTEM_NAMESPACE
    image: str = DEFAULT_IMAGE  # OPBOX_BUILDKIT_IMAGE
    service_account: str | None = None  # OPBOX_BUILD_SERVICE_ACCOUNT
    cache: bool = True  # OPBOX_BUILD_CACHE=0 turns the registry layer cache off
    cache_repo: str | None = None  # OPBOX_BUILD_CACHE_REPO: default <registry prefix>/opbox-cache
    timeout: int = 1800  # OPBOX_BUILD_TIMEOUT: seconds, the Job's deadline and the context URL's lifetime
    ttl_after_finished: int = 600  # OPBOX_BUILD_TTL_AFTER_FINISHED
    cpu: str | None = None  # OPBOX_BUILD_CPU: request
    memory: str | None = None  # OPBOX_BUILD_MEMORY: request and limit

    @classmethod
    def from_env(cls) -> "BuildKitSettings":
        env = os.environ
        settings = cls(
            namespace=env.get("OPBOX_BUILD_NAMESPACE") or env.get("OPBOX_SYSTEM_NAMESPACE") or cls.namespace,
            image=env.get("OPBOX_BUILDKIT_IMAGE") or cls.image,
            service_account=env.get("OPBOX_BUILD_SERVICE_ACCOUNT") or None,
            cache=env.get("OPBOX_BUILD_CACHE", "1").strip().lower() not in ("0", "false", "no", "off"),
            cache_repo=env.get("OPBOX_BUILD_CACHE_REPO") or None,
            timeout=max(60, env_int("OPBOX_BUILD_TIMEOUT", cls.timeout)),
            ttl_after_finished=max(0, env_int("OPBOX_BUILD_TTL_AFTER_FINISHED", cls.ttl_after_finished)),
            cpu=env.get("OPBOX_BUILD_CPU") or None,
            memory=env.get("OPBOX_BUILD_MEMORY") or None,
        )
        render.check_dns_label(settings.namespace, "build namespace (OPBOX_BUILD_NAMESPACE)")
        if settings.service_account:
            render.check_dns_subdomain(settings.service_account, "OPBOX_BUILD_SERVICE_ACCOUNT")
        for what, quantity in (("OPBOX_BUILD_CPU", settings.cpu), ("OPBOX_BUILD_MEMORY", settings.memory)):
            if quantity is not None:
                try:
                    parse_quantity(quantity)
                except (ValueError, ValidationError) as exc:
                    raise ConfigError(f"{what}: {exc}") from None
        return settings


@dataclass(frozen=True, kw_only=True)
class BuildKitJobSpec:
    """One build as a batch/v1 Job: what buildkit-job.yaml.j2 needs, validated."""

    name: str
    namespace: str
    image: str
    context_url: str  # presigned GET of the context tar.gz
    destination: str  # the image tag to push
    push_secret: str  # the per-build dockerconfigjson Secret
    cache_ref: str | None = None  # <cache repo>:buildcache
    insecure: bool = False  # the registry speaks plain HTTP
    service_account: str | None = None
    labels: dict = field(default_factory=dict, hash=False)
    active_deadline_seconds: int = 1800
    ttl_seconds_after_finished: int = 600
    cpu: str | None = None
    memory: str | None = None

    def __post_init__(self) -> None:
        render.check_dns_label(self.name, "build Job name")
        render.check_dns_label(self.namespace, "build namespace")
        render.check_dns_subdomain(self.push_secret, "push Secret name")
        if not self.context_url.startswith(("https://", "http://")) or any(c.isspace() for c in self.context_url):
            raise ValidationError(f"build context URL {self.context_url!r}: expected an http(s) URL")
        for image in (self.image, self.destination, self.cache_ref or "x"):
            if not image or any(c.isspace() or c == "," for c in image):
                raise ValidationError(f"image {image!r}: expected an image reference")

    def args(self) -> list[str]:
        insecure = ",registry.insecure=true" if self.insecure else ""
        args = ["build", "--frontend", "dockerfile.v0", "--opt", f"context={self.context_url}",
                "--opt", "filename=Dockerfile", "--output", f"type=image,name={self.destination},push=true{insecure}"]
        if self.cache_ref:
            args += ["--export-cache", f"type=registry,ref={self.cache_ref},mode=max{insecure}",
                     "--import-cache", f"type=registry,ref={self.cache_ref}{insecure}"]
        return args

    def context(self) -> dict[str, Any]:
        requests = {k: v for k, v in (("cpu", self.cpu), ("memory", self.memory)) if v}
        return {
            "name": self.name, "namespace": self.namespace, "labels": self.labels, "image": self.image,
            "args": self.args(), "push_secret": self.push_secret, "service_account": self.service_account,
            "uid": BUILDKIT_UID, "home": HOME, "requests": requests,
            "limits": {"memory": self.memory} if self.memory else {},
            "active_deadline_seconds": self.active_deadline_seconds,
            "ttl_seconds_after_finished": self.ttl_seconds_after_finished,
        }


def render_buildkit_job(spec: BuildKitJobSpec) -> dict:
    return render._load(render.render_text("buildkit-job.yaml.j2", **spec.context()), "buildkit-job")


def push_config(registry, host: str, repositories: list[str]) -> tuple[dict, str]:
    """The per-build docker config for pushing ``repositories`` of ``host``, and what it grants (for the log)."""
    token = registry.push_token(host, repositories)
    if token is not None:
        value, lifetime = token
        return ({"auths": {host: {"registrytoken": value}}},
                f"a token for pull,push of {', '.join(repositories)} only, valid {lifetime:g} s")
    creds = registry.credentials(host)
    if creds is None:
        return {"auths": {}}, "none (the registry asks for none)"
    auth = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
    return ({"auths": {host: {"auth": auth}}},
            f"the platform's own credentials for {host}: its Basic authentication cannot be scoped to a repository")


class BuildKitBuilder(KanikoBuilder):
    """An ``ImageBuilder`` building in the cluster with rootless BuildKit (see the module's doc)."""

    tool, container, memory_setting = "buildkit", CONTAINER, "OPBOX_BUILD_MEMORY"

    @staticmethod
    def check_store(store) -> None:
        if not hasattr(store, "download_url"):
            raise ConfigError("the buildkit builder hands build pods a signed URL of their context: the object "
                              "store must make them (OPBOX_STORE_URL=s3://...)")

    def _build(self, context_dir: Path, tag: str, log: Callable[[str], None]) -> str:
        if not (context_dir / "Dockerfile").is_file():
            raise BuildError(f"no Dockerfile in {context_dir}")
        settings = self.settings
        name = f"opbox-build-{hashlib.sha256(tag.encode()).hexdigest()[:12]}-{secrets.token_hex(3)}"
        key = f"builds/{name}.tar.gz"
        size = upload_context(self.store, context_dir, key)
        lines: list[str] = []

        def record(line: str) -> None:
            lines.append(line)
            log(line)

        host, repository, _ = parse_reference(tag)
        prefix = tag.rsplit(":", 1)[0].rsplit("/", 1)[0]
        cache = (settings.cache_repo or f"{prefix}/opbox-cache") if settings.cache else None
        repositories = [repository] + ([parse_reference(cache)[1]] if cache and parse_reference(cache)[0] == host else [])
        push_secret = f"{name}-push"
        labels = {"app.kubernetes.io/managed-by": "opbox", "app.kubernetes.io/component": "image-build",
                  "opbox.dev/build": name}
        batch, core = self._kube()
        spec = None
        try:
            config, grants = push_config(self.registry, host, repositories)
            url = self.store.download_url(key, expires=settings.timeout).url
            spec = BuildKitJobSpec(
                name=name, namespace=settings.namespace, image=settings.image, context_url=url, destination=tag,
                push_secret=push_secret, cache_ref=f"{cache}:buildcache" if cache else None,
                insecure=host in self.insecure_registries, service_account=settings.service_account,
                labels=labels, active_deadline_seconds=settings.timeout,
                ttl_seconds_after_finished=settings.ttl_after_finished, cpu=settings.cpu, memory=settings.memory)
            secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
                      "metadata": {"name": push_secret, "namespace": settings.namespace, "labels": labels},
                      "data": {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()}}
            self._call(core.create_namespaced_secret, settings.namespace, secret)
            job = self._call(batch.create_namespaced_job, settings.namespace, render_buildkit_job(spec))
            self._own(core, secret, job)
            record(f"buildkit Job {settings.namespace}/{name} building {tag} from a signed URL of its context "
                   f"({size:,} bytes); push credential: {grants}")
            failure = self._follow(spec, record)
        finally:
            self._forget_context(key)
            self._delete_secret(core, settings.namespace, push_secret)
        if failure:
            raise BuildError(f"building image {tag} in the cluster failed: {failure}", log="\n".join(lines) + "\n")
        self._delete_job(spec)  # a failed one stays for its TTL, to be looked at
        if not self.exists(tag):
            raise BuildError(f"the buildkit Job {settings.namespace}/{name} succeeded but the registry has no {tag}",
                             log="\n".join(lines) + "\n")
        return tag

    def _own(self, core, secret: dict, job: dict) -> None:
        """The push Secret owned by its Job: gone with it, should the gateway stop before deleting it."""
        owner = [{"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
                  "uid": job["metadata"]["uid"]}]
        owned = {**secret, "metadata": {**secret["metadata"], "ownerReferences": owner}}
        try:  # an update (the gateway's RBAC grants update on Secrets, not patch)
            self._call(core.replace_namespaced_secret, secret["metadata"]["name"], secret["metadata"]["namespace"],
                       owned)
        except Exception as exc:  # not fatal: the build deletes it when it ends
            log.warning("could not tie Secret %s to its build Job: %s", secret["metadata"]["name"], exc)

    @staticmethod
    def _delete_secret(core, namespace: str, name: str) -> None:
        try:
            core.delete_namespaced_secret(name, namespace, _request_timeout=30)
        except Exception as exc:
            if getattr(exc, "status", None) != 404:
                log.warning("could not delete the push Secret %s/%s: %s", namespace, name, exc)


def create_builder(settings: Settings, store, backend):
    """The builder registry's factory for ``OPBOX_BUILDER=buildkit``."""
    if settings.registry.split("/", 1)[0] == "localhost":
        raise ConfigError("the buildkit builder pushes images: set OPBOX_REGISTRY to a registry the cluster pulls "
                          "from, e.g. registry.example.com/opbox")
    from opbox.builder.container import ContainerBuilder
    from opbox.builder.registry import RegistryClient

    from .kaniko import DEFAULT_BASE_IMAGE

    registry = RegistryClient(insecure_hosts=settings.registry_insecure, auth_file=settings.registry_auth_file)
    builder = BuildKitBuilder(BuildKitSettings.from_env(), store=store, registry=registry,
                              kube_settings=backend.settings, insecure_registries=settings.registry_insecure)
    return ContainerBuilder(settings.home, base_image=settings.base_image or DEFAULT_BASE_IMAGE,
                            registry_prefix=settings.registry, wheelhouse_dir=settings.wheelhouse,
                            image_builder=builder, name="buildkit")
