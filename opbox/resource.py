"""``Resource``: what a job or service asks for, in Kubernetes' own quantity syntax.

Validated when it is made, so a bad value fails at decoration time. Turning it into
container limits or Kubernetes manifests is the backends' business, not this module's.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation

from .errors import ValidationError
from .retries import Retries

# https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/quantity/
_QUANTITY = re.compile(r"^([+]?[0-9]+(?:\.[0-9]*)?|[+]?\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$")
_SUFFIX = {
    "": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}
SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9_]{0,62})$")  # a workspace secret's name
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")  # a node label's value


def parse_quantity(value: str | int | float, what: str = "quantity") -> Decimal:
    """Parse a Kubernetes quantity ("100m", "0.5", "512Mi", "1e3") into a Decimal."""
    if isinstance(value, bool):
        raise ValidationError(f"{what}: expected a quantity such as '512Mi', got {value!r}")
    if isinstance(value, (int, float)):
        value = repr(value) if isinstance(value, float) else str(value)
    if not isinstance(value, str):
        raise ValidationError(f"{what}: expected a quantity such as '512Mi', got {value!r}")
    match = _QUANTITY.fullmatch(value.strip())
    if not match:
        raise ValidationError(
            f"{what}: {value!r} is not a Kubernetes quantity (examples: '100m', '0.5', '2', '512Mi', '10Gi')"
        )
    number, suffix = match.group(1), match.group(2) or ""
    try:
        base = Decimal(number)
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only numbers
        raise ValidationError(f"{what}: {value!r} is not a number") from exc
    if suffix[:1] in ("e", "E"):
        return base * (Decimal(10) ** int(suffix[1:]))
    return base * _SUFFIX[suffix]


def _check_quantity(value, what: str, *, binary: bool) -> str | None:
    if value is None:
        return None
    amount = parse_quantity(value, what)
    if amount <= 0:
        raise ValidationError(f"{what}: must be more than zero, got {value!r}")
    if binary and amount < 1:
        raise ValidationError(f"{what}: {value!r} is less than one byte; did you mean '{value}i' or 'Mi'?")
    return str(value).strip() if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class Resource:
    """Compute a run or a service replica asks for.

    ``cpu``, ``memory`` and ``disk`` use Kubernetes quantities. ``gpu`` names a GPU type
    (a node label value such as ``"nvidia-tesla-t4"``); ``gpu_count`` how many. ``timeout``
    (seconds) and ``max_retries`` apply to each Job-Run (``retries``: with backoff and filters, see
    ``Retries``); ``retention_days``, how long a finished run's arguments, result and log are kept
    (default: the platform's ``OPBOX_RETENTION_DAYS``). ``env`` is for settings that are not secret
    (it is stored with the version, as the versions API shows it); ``secrets`` names workspace secrets
    whose keys become environment variables of runs and replicas (their values are never stored here).
    ``allow_cpu_fallback``: a GPU job deploys on a backend without a GPU (with a warning) instead of
    being refused.
    """

    cpu: str | None = None
    memory: str | None = None
    disk: str | None = None
    gpu: str | None = None
    gpu_count: int = 0
    timeout: float | None = None
    max_retries: int = 0
    env: dict[str, str] = field(default_factory=dict, hash=False)
    retention_days: float | None = None
    secrets: tuple[str, ...] = ()
    retries: Retries | None = None
    allow_cpu_fallback: bool = False

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "cpu", _check_quantity(self.cpu, "cpu", binary=False))
        set_(self, "memory", _check_quantity(self.memory, "memory", binary=True))
        set_(self, "disk", _check_quantity(self.disk, "disk", binary=True))
        if self.gpu is not None and (not isinstance(self.gpu, str) or not _LABEL_VALUE.fullmatch(self.gpu)):
            raise ValidationError(
                f"gpu: {self.gpu!r} is not a GPU type (a node label value such as 'nvidia-tesla-t4' or 'Tesla-T4')")
        if isinstance(self.gpu_count, bool) or not isinstance(self.gpu_count, int) or self.gpu_count < 0:
            raise ValidationError(f"gpu_count: expected a whole number >= 0, got {self.gpu_count!r}")
        if not isinstance(self.allow_cpu_fallback, bool):
            raise ValidationError(f"allow_cpu_fallback: expected True or False, got {self.allow_cpu_fallback!r}")
        if self.gpu is not None and self.gpu_count == 0:
            set_(self, "gpu_count", 1)
        if self.timeout is not None:
            if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or not self.timeout > 0:
                raise ValidationError(f"timeout: expected seconds > 0, got {self.timeout!r}")
            set_(self, "timeout", float(self.timeout))
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or not 0 <= self.max_retries <= 100:
            raise ValidationError(f"max_retries: expected a whole number from 0 to 100, got {self.max_retries!r}")
        if self.retention_days is not None:
            if isinstance(self.retention_days, bool) or not isinstance(self.retention_days, (int, float)) \
                    or not self.retention_days > 0:
                raise ValidationError(f"retention_days: expected a number of days > 0, got {self.retention_days!r}")
            set_(self, "retention_days", float(self.retention_days))
        if not isinstance(self.env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()):
            raise ValidationError("env: expected a dict of str to str")
        set_(self, "env", dict(self.env))
        names = (self.secrets,) if isinstance(self.secrets, str) else self.secrets
        if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) and SECRET_NAME.fullmatch(n) for n in names):
            raise ValidationError(f"secrets: expected names of workspace secrets (lowercase letters, digits, - and _), "
                                  f"got {self.secrets!r}")
        set_(self, "secrets", tuple(dict.fromkeys(names)))
        if isinstance(self.retries, dict):
            set_(self, "retries", Retries.from_dict(self.retries))
        if self.retries is not None:
            if not isinstance(self.retries, Retries):
                raise ValidationError(f"retries: expected an opbox.Retries, got {type(self.retries).__name__}")
            if self.max_retries not in (0, self.retries.max_retries):
                raise ValidationError(f"max_retries={self.max_retries} and retries=Retries(max_retries="
                                      f"{self.retries.max_retries}) disagree; give one")
            set_(self, "max_retries", self.retries.max_retries)

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory is None else int(parse_quantity(self.memory))

    @property
    def disk_bytes(self) -> int | None:
        return None if self.disk is None else int(parse_quantity(self.disk))

    @property
    def cpu_cores(self) -> float | None:
        return None if self.cpu is None else float(parse_quantity(self.cpu))

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v not in (None, {}, 0, ()) or k == "max_retries"}
        if self.secrets:
            out["secrets"] = list(self.secrets)
        if self.retries is not None:
            out["retries"] = self.retries.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> "Resource":
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValidationError(f"resource: expected an object, got {type(data).__name__}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValidationError(f"resource: unknown field(s) {sorted(unknown)}")
        return cls(**data)

    def merge(self, **overrides) -> "Resource":
        """A copy with the given fields replaced (``None`` values are ignored)."""
        data = {f: getattr(self, f) for f in self.__dataclass_fields__}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return Resource(**data)
