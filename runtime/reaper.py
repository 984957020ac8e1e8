"""Processes a run starts end with the run.

The runtime makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``): a process that a run
starts and leaves behind, even a daemon that double-forks and calls ``setsid``, is reparented
to the runtime rather than to init. So once a run ends, every process left under the runtime
is the run's, and ``end_leftovers`` kills and reaps them. Checking costs a read of
``/proc/self/task/*/children``, and only when the runtime has a child at all (one ``waitpid``
answers that), so a run that starts nothing pays about a microsecond.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

from opbox.processes import tree

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux >= 3.4); False where it is not possible."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def end_leftovers(patience: float = 2.0) -> int:
    """SIGKILL every process left under this one, reap them, and return how many there were."""
    try:  # the common case, one system call: no child at all (a leftover descendant would be one, adopted)
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return 0
    killed: set[int] = set()
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:  # a process may fork while we look: look again until none is left
        seen = tree("self")[1:]
        if not seen:
            break
        for pid in seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed.update(seen)
        _reap(min(deadline, time.monotonic() + 0.2))
    return len(killed)


def _reap(until: float) -> None:
    """Collect exited children (the killed ones, and orphans they leave to us) until none is left or ``until``."""
    while time.monotonic() < until:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children at all
        if pid == 0:
            time.sleep(0.001)  # some are still dying
