"""Starting runtime processes on this machine: what every local spawn site shares.

Each process runs in its own session (so a kill reaches what it started) and is tied to the
gateway's life (PR_SET_PDEATHSIG). Its environment is built from an allow-list, never copied
from the gateway's: the locale, ``PATH``, proxy and CA settings, then the version's own
``Resource.env``, then the runtime's variables. Where the platform can make one (root and
bubblewrap), it starts inside a sandbox as its workspace's uid (``sandbox.py``): the code is
mounted read-only at ``/app``, which is also the working directory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from opbox.processes import die_with_parent, tree

from ..base import VersionInfo
from . import gpus
from .sandbox import Sandbox

_PAGE = os.sysconf("SC_PAGE_SIZE")
PASSED = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
          "http_proxy", "https_proxy", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
          "CUDA_VISIBLE_DEVICES")  # what user code gets of the gateway's environment; nothing else
UNSEALED = ("HOME", "TMPDIR")  # outside a sandbox the user's home and temp folder are the gateway's
SANDBOX_CODE_DIR = "/app"


def process_env(version: VersionInfo, runtime: Mapping[str, str], sealed: bool = False) -> dict[str, str]:
    """The environment of a runtime process: the allow-listed part of this one's, the version's
    ``Resource.env``, the GPUs granted to a job that asks for some (``CUDA_VISIBLE_DEVICES``), then
    ``runtime``; in a sandbox, home and temp are its private /tmp."""
    passed = PASSED if sealed else PASSED + UNSEALED
    env = {name: os.environ[name] for name in passed if name in os.environ}
    if sealed:
        env["HOME"] = env["TMPDIR"] = "/tmp"
    env.update(version.resource.env)
    devices = gpus.visible_devices(version.resource)
    if devices is not None:  # the GPUs granted to the job (gpus.py)
        env["CUDA_VISIBLE_DEVICES"] = devices
    env.update(runtime)
    if sealed:
        env["OPBOX_CODE_DIR"] = SANDBOX_CODE_DIR
    return env


async def start_runtime(version: VersionInfo, runtime: Mapping[str, str], args: list[str], log_path: Path,
                        sandbox: Sandbox | None, *, readable: tuple[str, ...] = (),
                        pass_fds: tuple[int, ...] = ()) -> asyncio.subprocess.Process:
    """``python -m opbox.runtime *args`` of ``version``, its output appended to ``log_path``; sealed in
    ``sandbox`` when there is one (``readable``: more host paths it may read, e.g. an init file)."""
    artifact = version.artifact
    argv = [artifact.python or sys.executable, "-m", "opbox.runtime", *args]
    cwd = artifact.code_dir
    if sandbox is not None:
        venv = (artifact.venv,) if artifact.venv else ()
        argv = sandbox.command(argv, workspace=version.workspace, code_dir=artifact.code_dir,
                               readable=(*venv, *readable))
        cwd = "/"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=process_env(version, runtime, sealed=sandbox is not None),
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent, pass_fds=pass_fds)


def rss_bytes(pid: int) -> int | None:
    """The resident memory of ``pid`` and all its descendants (what a pod's cgroup would count)."""
    total, found = 0, False
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
                found = True
        except (OSError, ValueError, IndexError):
            continue
    return total if found else None


def signal_runtime(proc: asyncio.subprocess.Process | None, signum: int, sealed: bool) -> None:
    """SIGKILL ends the process group (everything a run started, a sandbox and all in it). Other signals
    are requests to the runtime itself (SIGTERM: stop; SIGUSR1: cancel the run in hand): in a sandbox they
    go to the runtime process only, as bwrap would die of them and take the sandbox down at once."""
    if proc is None or proc.returncode is not None:
        return
    target = proc.pid
    if sealed and signum != signal.SIGKILL:
        runtime = [p for p in tree(proc.pid) if _is_runtime(p)]
        if runtime:
            try:
                os.kill(runtime[-1], signum)
            except ProcessLookupError:
                pass
            return
    try:
        os.killpg(target, signum)
    except ProcessLookupError:
        pass


def _is_runtime(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"\0opbox.runtime\0" in f.read() and not _is_wrapper(pid)
    except OSError:
        return False


def _is_wrapper(pid: int) -> bool:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")) in ("bwrap", "setpriv")
    except OSError:
        return True
