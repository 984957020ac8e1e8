"""This machine's NVIDIA GPUs, for jobs that ask for them (``Resource(gpu=..., gpu_count=N)``).

Found once per platform process: ``nvidia-smi --query-gpu=index,uuid,name --format=csv,noheader``,
else the driver's ``/proc/driver/nvidia/gpus/*/information``. A job asking for ``N`` GPUs (of its
type, when it names one) is granted the first ``N`` that fit, given to its processes as
``CUDA_VISIBLE_DEVICES``; on one machine jobs share the GPUs they are granted (as processes on a
workstation do), they are not reserved. A deploy the machine cannot satisfy is refused, or with
``allow_cpu_fallback=True`` warned about.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from opbox.errors import ValidationError
from opbox.resource import Resource

PROC_GPUS = Path("/proc/driver/nvidia/gpus")
QUERY = ["--query-gpu=index,uuid,name", "--format=csv,noheader"]


@dataclass(frozen=True)
class Gpu:
    index: str
    uuid: str
    name: str


def _nvidia_smi() -> list[Gpu] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, *QUERY], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    gpus = []
    for line in done.stdout.splitlines():
        fields = [f.strip() for f in line.split(",", 2)]
        if len(fields) == 3 and fields[0].isdigit():
            gpus.append(Gpu(*fields))
    return gpus


def _proc() -> list[Gpu]:
    try:
        folders = sorted(PROC_GPUS.iterdir())
    except OSError:
        return []
    gpus = []
    for i, folder in enumerate(folders):
        try:
            info = (folder / "information").read_text(errors="replace")
        except OSError:
            continue
        model = re.search(r"^Model:\s*(.+)$", info, re.M)
        uuid = re.search(r"^GPU UUID:\s*(\S+)$", info, re.M)
        gpus.append(Gpu(str(i), uuid.group(1) if uuid else "", model.group(1).strip() if model else "NVIDIA GPU"))
    return gpus


@functools.cache
def detect() -> tuple[Gpu, ...]:
    found = _nvidia_smi()
    return tuple(found if found is not None else _proc())


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _fits(gpu: Gpu, wanted: str | None) -> bool:
    """A type such as "nvidia-tesla-t4" names a GPU called "Tesla T4" (either may hold the other)."""
    if not wanted:
        return True
    a, b = _squash(gpu.name), _squash(wanted)
    return a in b or b in a


def grant(resource: Resource) -> list[Gpu]:
    """The GPUs a job's processes get; raises ``ValidationError`` when the machine has too few."""
    gpus = detect()
    fitting = [g for g in gpus if _fits(g, resource.gpu)]
    if len(fitting) >= resource.gpu_count:
        return fitting[:resource.gpu_count]
    what = f"{resource.gpu_count} GPU{'s' if resource.gpu_count > 1 else ''}" + (
        f" of type {resource.gpu!r}" if resource.gpu else "")
    have = ", ".join(f"{g.index}: {g.name}" for g in gpus) or "none (no nvidia-smi, no /proc/driver/nvidia/gpus)"
    raise ValidationError(
        f"the job asks for {what}, but this machine's local backend has {len(fitting)} that fit (GPUs here: {have}). "
        f"Deploy with Resource(..., allow_cpu_fallback=True) to run it on the CPU, drop gpu= from its Resource, or "
        f"run the platform on a machine or cluster with such GPUs", gpus=[g.name for g in gpus])


def check(resource: Resource) -> list[str]:
    """At deploy: [] when the GPUs are there (or none is asked for), a warning when the job may fall back to the
    CPU; else the refusal of ``grant``."""
    if not resource.gpu_count:
        return []
    try:
        grant(resource)
    except ValidationError as refusal:
        if not resource.allow_cpu_fallback:
            raise
        return [f"{refusal.message.split('. Deploy with')[0]}: it runs on the CPU (allow_cpu_fallback=True)"]
    return []


def visible_devices(resource: Resource) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for a job's processes: its granted GPUs' indices ("" when it falls back to the
    CPU); ``None`` for a job that asks for no GPU (the platform's own setting passes through)."""
    if not resource.gpu_count:
        return None
    try:
        return ",".join(g.index for g in grant(resource))
    except ValidationError:
        return ""
