"""Starting runtime processes on this machine: what every local spawn site shares.

Each process runs in its own session (so a kill reaches what it started), is tied to the
gateway's life (PR_SET_PDEATHSIG), and inherits the gateway's environment without its
secrets, under the version's own ``Resource.env`` and the runtime's variables.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Mapping

from ..base import VersionInfo

_PAGE = os.sysconf("SC_PAGE_SIZE")
_PR_SET_PDEATHSIG = 1
_SECRETS = ("OPBOX_TOKEN", "OPBOX_SECRET")  # the gateway's own credentials never reach user code


def child_setup() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:  # not Linux: the worker notices the gateway is gone and exits by itself
        pass


def process_env(version: VersionInfo, runtime: Mapping[str, str]) -> dict[str, str]:
    """The environment of a runtime process: this one's, the version's ``Resource.env``, then ``runtime``."""
    env = {**os.environ, **version.resource.env, **runtime}
    for secret in _SECRETS:
        env.pop(secret, None)
    return env


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None
