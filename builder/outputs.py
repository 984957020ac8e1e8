"""Build outputs on this machine that no version uses any more: collected, so storage shrinks.

Both builders extract code into ``home/code/<hash[:2]>/<hash>``; the local one also makes
virtualenvs in ``home/envs/``. A folder no version's artifact names, and older than
``older_than`` (a build may be making it right now), is removed. Images are left to the
container engine (``podman image prune``) and the registry's own retention.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def _size(folder: Path) -> int:
    total = 0
    for base, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                continue
    return total


def _unused(candidates, in_use: set[str], older_than: float):
    for path in candidates:
        try:
            stale = path.is_dir() and not path.is_symlink() and path.stat().st_mtime < older_than
        except OSError:
            continue
        if stale and str(path) not in in_use:
            yield path


def collect_outputs(home: Path, artifacts: list[dict], older_than: float) -> tuple[int, int]:
    """Remove code folders and environments that no artifact in ``artifacts`` names (their stored form),
    last changed before ``older_than`` (Unix time). Returns (folders removed, bytes freed)."""
    in_use = {str(a[key]) for a in artifacts for key in ("code_dir", "env") if a.get(key)}
    code_root, env_root = Path(home) / "code", Path(home) / "envs"
    candidates = [*(code_root.glob("*/*") if code_root.is_dir() else ()),
                  *(p for p in (env_root.iterdir() if env_root.is_dir() else ()) if not p.name.startswith("."))]
    removed = freed = 0
    for path in _unused(candidates, in_use, older_than):
        size = _size(path)
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed, freed = removed + 1, freed + size
    return removed, freed
