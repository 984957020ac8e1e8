"""``Image``: what a job's container image is made of beyond its code and ``requirements.txt``.

    @operator(image=Image(base="nvidia/cuda:12.4.1-runtime-ubuntu22.04", apt=["ffmpeg"],
                          pip=["torch==2.4.0"], run=["python -c 'import torch'"]))

Validated when it is made (each value ends up in a Dockerfile, so nothing may break out of its
line), carried in the deploy, and rendered by the image builders as cached layers in this order:
``apt`` packages, ``pip`` requirements, ``run`` commands, then the code. The local backend has no
image: it installs ``pip`` into the job's virtualenv and refuses the rest at deploy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ValidationError

# docker/distribution reference grammar, simplified: [host[:port]/]path[:tag][@digest]
IMAGE_REF = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?")
_APT = re.compile(r"[a-z0-9][a-z0-9+.-]*(?:=[A-Za-z0-9.+~:-]+)?")  # a Debian package, optionally =version
_PIP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:\[[A-Za-z0-9._, -]*\])?(?:\s*(?:[<>=!~@;(].*)?)?")  # PEP 508-ish
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _strings(value, what: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise ValidationError(f"image {what}: expected a list of strings, got {value!r}")
    items = tuple(v.strip() for v in items)
    for item in items:
        if not item or _CONTROL.search(item):
            raise ValidationError(f"image {what}: {item!r} is empty or holds a newline or control character "
                                  f"(give one item per entry)")
    return items


@dataclass(frozen=True)
class Image:
    """A job image: ``base`` (an image reference with the client's Python, or one whose ``apt`` adds it),
    ``apt`` (Debian/Ubuntu package names, ``name`` or ``name=version``), ``pip`` (requirement specifiers, as
    in requirements.txt), ``run`` (shell commands run after those, each its own line)."""

    base: str | None = None
    apt: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    run: tuple[str, ...] = ()

    def __post_init__(self):
        set_ = object.__setattr__
        if self.base is not None:
            if not isinstance(self.base, str) or len(self.base) > 255 or not IMAGE_REF.fullmatch(self.base.strip()):
                raise ValidationError(f"image base: {self.base!r} is not an image reference "
                                      "(such as 'python:3.11-slim' or 'nvidia/cuda:12.4.1-runtime-ubuntu22.04')")
            set_(self, "base", self.base.strip())
        apt = _strings(self.apt, "apt")
        for name in apt:
            if not _APT.fullmatch(name):
                raise ValidationError(f"image apt: {name!r} is not a package name (such as 'ffmpeg' or "
                                      "'libgl1=1.4.0-1')")
        pip = _strings(self.pip, "pip")
        for spec in pip:
            if not _PIP.fullmatch(spec):
                raise ValidationError(f"image pip: {spec!r} is not a requirement (such as 'numpy==2.1.0'); "
                                      "pip options are not taken here")
        run = _strings(self.run, "run")
        for command in run:
            if command.endswith("\\"):
                raise ValidationError(f"image run: {command!r} ends with a backslash; give each command whole")
        set_(self, "apt", tuple(dict.fromkeys(apt)))
        set_(self, "pip", pip)
        set_(self, "run", run)

    def to_dict(self) -> dict:
        out: dict = {} if self.base is None else {"base": self.base}
        out.update({k: list(getattr(self, k)) for k in ("apt", "pip", "run") if getattr(self, k)})
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> "Image | None":
        if data is None:
            return None
        if not isinstance(data, dict):
            raise ValidationError(f"image: expected an object, got {type(data).__name__}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValidationError(f"image: unknown field(s) {sorted(unknown)}")
        return cls(**data)

    def beyond_pip(self) -> list[str]:
        """What only an image builder can honour: the fields set other than ``pip``."""
        return [f"{name}={getattr(self, name)!r}" for name in ("base", "apt", "run")
                if getattr(self, name)]
