"""One workspace cannot starve another: runs in progress are counted per workspace, and when
several workspaces have work, each may run its share of the machine (``capacity`` split evenly
between them, at least one). Alone, a workspace may use it all. A run over its workspace's share
waits here, in order, and starts as soon as the share allows (a run of that workspace ends, or
another workspace goes idle). Nothing is preempted: shares converge as runs end.
"""

from __future__ import annotations

from collections import deque

from .base import RunTicket


class FairShare:
    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.running: dict[str, int] = {}
        self.waiting: dict[str, deque[RunTicket]] = {}

    def share(self, workspace: str) -> int:
        active = set(self.running) | set(self.waiting)
        active.add(workspace)
        return max(1, self.capacity // len(active))

    def admit(self, ticket: RunTicket) -> bool:
        """Count the run in, or keep it waiting (False) while its workspace is at its share."""
        ws = ticket.workspace
        running = self.running.get(ws, 0)
        if running >= self.share(ws):
            self.waiting.setdefault(ws, deque()).append(ticket)
            return False
        self.running[ws] = running + 1
        return True

    def release(self, workspace: str) -> list[RunTicket]:
        """A run of ``workspace`` ended (or never started): the waiting runs that may start now."""
        left = self.running.get(workspace, 0) - 1
        if left > 0:
            self.running[workspace] = left
        else:
            self.running.pop(workspace, None)
        ready = []
        for ws in list(self.waiting):
            queue = self.waiting[ws]
            while queue and self.running.get(ws, 0) + sum(1 for t in ready if t.workspace == ws) < self.share(ws):
                ready.append(queue.popleft())
            if not queue:
                del self.waiting[ws]
        return ready
