"""The backends and builders this build knows, by name; each imported only when chosen.

One table instead of if-chains in the composition root and hard-coded choices in the CLI:
a new backend is a package under ``backends/`` with a ``create(settings, token_for,
gateway_url)`` factory and a line in ``BACKENDS``. Which builders suit which backends is
data too (``BuilderKind.backends``), with the message a wrong pairing gets.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from opbox.errors import ConfigError

if TYPE_CHECKING:
    from opbox.builder.base import Builder

    from ..settings import Settings
    from .base import Backend


@dataclass(frozen=True)
class BackendKind:
    name: str
    runs_on: str  # for help texts: "Where runs execute: ..."
    default_builder: str
    factory: str  # "module:function" relative to this package, imported when chosen


@dataclass(frozen=True)
class BuilderKind:
    name: str
    factory: Callable  # (settings, store, backend) -> Builder
    backends: tuple[str, ...] | None = None  # the backends it works with; None: any
    refusal: str = ""  # the ConfigError's message with another backend ({backend}, {builder})


BACKENDS = {kind.name: kind for kind in (
    BackendKind("local", "local processes", "local", ".local.backend:create"),
    BackendKind("container", "podman containers", "podman", ".container.backend:create"),
    BackendKind("kubernetes", "Kubernetes Jobs", "podman", ".kubernetes.backend:create"),
)}


def _local_builder(settings: Settings, store, backend) -> Builder:
    from opbox.builder.local import LocalBuilder

    return LocalBuilder(settings.home, isolation=backend.sandbox)  # only ever paired with the local backend


def _podman_builder(settings: Settings, store, backend) -> Builder:
    from opbox.builder.container import ContainerBuilder
    from opbox.builder.image import DEFAULT_BASE_IMAGE

    return ContainerBuilder(settings.home, base_image=settings.base_image or DEFAULT_BASE_IMAGE,
                            registry_prefix=settings.registry, wheelhouse_dir=settings.wheelhouse)


def _kaniko_builder(settings: Settings, store, backend) -> Builder:
    from .kubernetes.kaniko import create_builder

    return create_builder(settings, store, backend)


def _buildkit_builder(settings: Settings, store, backend) -> Builder:
    from .kubernetes.buildkit import create_builder

    return create_builder(settings, store, backend)


BUILDERS = {kind.name: kind for kind in (
    BuilderKind("local", _local_builder, ("local",),
                "the {backend} backend runs images: use the podman builder, not {builder!r}"),
    BuilderKind("podman", _podman_builder),
    BuilderKind("buildkit", _buildkit_builder, ("kubernetes",),
                "the buildkit builder runs in the cluster: use it with OPBOX_BACKEND=kubernetes"),
    BuilderKind("kaniko", _kaniko_builder, ("kubernetes",),
                "the kaniko builder runs in the cluster: use it with OPBOX_BACKEND=kubernetes"),
)}


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def builder_names() -> tuple[str, ...]:
    return tuple(BUILDERS)


def _load(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module, __package__), name)


def make_backend(settings: Settings, token_for: Callable[[str], str], gateway_url: str) -> Backend:
    """The backend ``settings.backend`` names; ``gateway_url`` is where its runtimes reach the gateway."""
    kind = BACKENDS.get(settings.backend)
    if kind is None:
        raise ConfigError(f"unknown backend {settings.backend!r}; this build knows: {', '.join(BACKENDS)}")
    return _load(kind.factory)(settings, token_for, gateway_url)


def make_builder(settings: Settings, store, backend: Backend) -> Builder:
    """The builder ``settings.builder`` names, else the backend's default; refused when it does
    not suit the backend (``local`` makes no images; ``buildkit`` and ``kaniko`` build in the cluster)."""
    name = settings.builder or BACKENDS[settings.backend].default_builder
    kind = BUILDERS.get(name)
    if kind is None:
        raise ConfigError(f"unknown builder {name!r}; this build knows: {', '.join(BUILDERS)}")
    if kind.backends is not None and settings.backend not in kind.backends:
        raise ConfigError(kind.refusal.format(backend=settings.backend, builder=name))
    return kind.factory(settings, store, backend)
