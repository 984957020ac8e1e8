"""Sealing user code on one machine: a bubblewrap sandbox and one unprivileged uid per workspace.

Runs, service replicas and build steps of the local backend start inside ``bwrap``: a fresh
mount namespace that holds only the system (``/usr``, ``/etc``), the Python the platform runs
on, the platform's own packages, the version's virtualenv and its code, all read-only, plus a
private ``/tmp`` (also the home). Nothing else of the host is there: not ``OPBOX_HOME`` (state,
secret, credentials, other workspaces' code), not the repository, not other users' files. A
fresh PID namespace hides every other process, and its end ends every process the code started.
Inside, ``setpriv`` drops to the workspace's own uid and gid (no supplementary groups, no
capabilities, no new privileges), so what one workspace's code may touch on the host, another's
may not, and neither may write the shared virtualenvs.

It needs root (to switch uids) and ``bwrap`` (Debian's ``bubblewrap``). Without them the local
backend still runs, unsealed, and says so at start-up (``sandbox_or_warning``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import opbox
from opbox.errors import ConfigError

log = logging.getLogger("opbox.sandbox")

UID_BASE = 200_000  # far above login users and Debian's system range
UID_SPAN = 100_000
SYSTEM_PATHS = ("/usr", "/etc")
MERGED_USR = ("/bin", "/lib", "/lib64", "/sbin")  # symlinks into /usr on Debian; folders elsewhere


def _platform_paths() -> tuple[str, ...]:
    """What a runtime needs to import opbox and its dependencies: the interpreter's prefix, the platform's
    environment (job virtualenvs reach its site-packages through a .pth file), and the opbox package with
    the folders its symlinks point to (an editable install keeps them in the repository)."""
    package = Path(opbox.__file__).resolve().parent
    paths = {sys.base_prefix, sys.prefix, str(package)}
    for entry in package.iterdir():
        if entry.is_symlink():
            paths.add(str(entry.resolve()))
    return tuple(sorted(paths))


class UidMap:
    """A uid per workspace, allocated once and kept in a small JSON file in the platform's home."""

    def __init__(self, path: Path, base: int = UID_BASE):
        self.path = path
        self.base = base
        self.uids: dict[str, int] = json.loads(path.read_text()) if path.exists() else {}

    def uid(self, workspace: str) -> int:
        uid = self.uids.get(workspace)
        if uid is None:
            uid = self.uids[workspace] = self.base + len(self.uids)
            if uid >= self.base + UID_SPAN:
                raise RuntimeError(f"no free sandbox uid left for workspace {workspace!r}")
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.uids))
            os.replace(tmp, self.path)
        return uid


@dataclass(frozen=True)
class Sandbox:
    bwrap: str
    setpriv: str
    uids: UidMap
    readable: tuple[str, ...] = field(default_factory=_platform_paths)

    def owner(self, workspace: str) -> int:
        return self.uids.uid(workspace)

    def command(self, argv: list[str], *, workspace: str, readable: tuple[str, ...] = (),
                writable: tuple[str, ...] = (), code_dir: str | None = None, cwd: str | None = None) -> list[str]:
        """``argv`` run as ``workspace``'s uid in a sandbox that sees ``readable`` (read-only, at the same
        paths) besides the system and the platform's Python; ``code_dir`` is mounted read-only at /app.
        The working directory is ``cwd`` (default /app with code, else /tmp)."""
        uid = self.uids.uid(workspace)
        cmd = [self.bwrap, "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
               "--hostname", "opbox", "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]
        for path in SYSTEM_PATHS:
            cmd += ["--ro-bind", path, path]
        for path in MERGED_USR:
            if os.path.islink(path):
                cmd += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                cmd += ["--ro-bind", path, path]
        binds = [("--ro-bind", path, path) for path in (*self.readable, *readable)]
        binds += [("--bind", path, path) for path in writable]
        if code_dir is not None:
            binds.append(("--ro-bind", code_dir, "/app"))
        for folder in _parents(dest for _, _, dest in binds):  # else bwrap makes them 0700 root: untraversable
            cmd += ["--perms", "0755", "--dir", folder]
        for how, source, dest in binds:
            cmd += [how, source, dest]
        cmd += ["--chdir", cwd or ("/app" if code_dir is not None else "/tmp"), "--",
                self.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
                "--inh-caps=-all", "--bounding-set=-all", "--", *argv]
        return cmd


def _parents(paths) -> list[str]:
    """The folders above ``paths`` that the sandbox's root lacks, outermost first (/root, /root/.pyenv, ...)."""
    found = set()
    for path in paths:
        for parent in Path(path).parents:
            if str(parent) not in ("/", *SYSTEM_PATHS) and not str(parent).startswith(("/usr/", "/etc/")):
                found.add(str(parent))
    return sorted(found, key=lambda p: (p.count("/"), p))


def find_sandbox(home: Path) -> Sandbox | None:
    """A sandbox when this process may make one (root, bwrap and setpriv installed), else None."""
    bwrap, setpriv = shutil.which("bwrap"), shutil.which("setpriv")
    if os.geteuid() != 0 or not bwrap or not setpriv:
        return None
    return Sandbox(bwrap, setpriv, UidMap(home / "sandbox-uids.json"))


def open_sandbox(home: Path, mode: str) -> Sandbox | None:
    """The sandbox for ``OPBOX_SANDBOX=mode`` (auto, required, off); without one, say so loudly."""
    if mode not in ("auto", "required", "off"):
        raise ConfigError(f"OPBOX_SANDBOX must be auto, required or off, got {mode!r}")
    sandbox = find_sandbox(home) if mode != "off" else None
    if sandbox is None:
        why = "OPBOX_SANDBOX=off" if mode == "off" else unsealed_reason()
        if mode == "required":
            raise ConfigError(f"OPBOX_SANDBOX=required, but no sandbox can be made here: {why}")
        log.warning("workspaces are NOT isolated from each other on this machine (%s): runs, service replicas "
                    "and builds run as the platform's own user and can read its files; see README, Threat model",
                    why)
    return sandbox


def unsealed_reason() -> str:
    """Why find_sandbox gives None here, for the start-up warning."""
    if os.geteuid() != 0:
        return "the platform does not run as root, so it cannot give each workspace its own uid"
    return "bubblewrap (bwrap) or setpriv is not installed (apt-get install bubblewrap)"
