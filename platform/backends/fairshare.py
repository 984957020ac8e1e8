"""One workspace cannot starve another: runs in progress are counted per workspace, and when
several workspaces have work, each may run its share of the machine (``capacity`` split evenly
between them, at least one). Alone, a workspace may use it all. A run over its workspace's share
waits here, in order, and starts as soon as the share allows (a run of that workspace ends, or
another workspace goes idle). Nothing is preempted: shares converge as runs end.

A worker holding a group of a map's runs (``admit_extra``) has one of them in progress; the others
wait in its hands. They are counted too, but taken only while their workspace is the only one with
work, and they do not use its share: the share counts runs in progress.
"""

from __future__ import annotations

from collections import deque

from .base import RunTicket


class FairShare:
    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.running: dict[str, int] = {}
        self.waiting: dict[str, deque[RunTicket]] = {}
        self.extra: dict[str, int] = {}  # of ``running``: runs in a worker's group behind the one it has in hand

    def share(self, workspace: str) -> int:
        active = set(self.running) | set(self.waiting)
        active.add(workspace)
        return max(1, self.capacity // len(active))

    def admit(self, ticket: RunTicket) -> bool:
        """Count the run in, or keep it waiting (False) while its workspace is at its share."""
        ws = ticket.workspace
        running = self.running.get(ws, 0)
        if running - self.extra.get(ws, 0) >= self.share(ws):
            self.waiting.setdefault(ws, deque()).append(ticket)
            return False
        self.running[ws] = running + 1
        return True

    def admit_extra(self, ticket: RunTicket) -> bool:
        """Count in a run for a worker's group behind the one it holds, only while no other workspace has work
        (False: it stays where it was, nothing waits here)."""
        ws = ticket.workspace
        if self.waiting or any(other != ws for other in self.running):
            return False
        self.running[ws] = self.running.get(ws, 0) + 1
        self.extra[ws] = self.extra.get(ws, 0) + 1
        return True

    def release_extra(self, workspace: str) -> list[RunTicket]:
        """One run of a worker's group left it while others stay (its runs in progress do not change)."""
        _count_out(self.extra, workspace)
        return self.release(workspace)

    def release(self, workspace: str) -> list[RunTicket]:
        """A run of ``workspace`` ended (or never started): the waiting runs that may start now."""
        _count_out(self.running, workspace)
        ready = []
        for ws in list(self.waiting):
            queue = self.waiting[ws]
            while queue and self.running.get(ws, 0) - self.extra.get(ws, 0) + sum(1 for t in ready if t.workspace == ws) < self.share(ws):
                ready.append(queue.popleft())
            if not queue:
                del self.waiting[ws]
        return ready


def _count_out(counts: dict[str, int], workspace: str) -> None:
    """One less for ``workspace`` (none left: not there)."""
    left = counts.get(workspace, 0) - 1
    if left > 0:
        counts[workspace] = left
    else:
        counts.pop(workspace, None)
