"""Linux process helpers shared by the runtime, the builder and the platform's local backend (each may
import the SDK, none may import another): a process's children and whole tree read from /proc, and
tying a child to its parent's life."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def children(pid: int | str) -> list[int]:
    """The direct children of ``pid`` ("self" for this process), from each of its threads' lists."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return found


def tree(pid: int | str) -> list[int]:
    """``pid`` and every process under it, parents before their children."""
    todo, seen = [pid], []
    while todo:
        seen.append(todo.pop())
        todo.extend(children(seen[-1]))
    return seen


def die_with_parent() -> None:
    """``preexec_fn`` for the platform's children (builds, runtimes): SIGKILL when the gateway dies, so no
    build or run outlives it (Linux; elsewhere a runtime notices the gateway is gone by itself)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:
        pass
