"""Warm worker pools: one per job version, for the backends that keep workers (local, container).

Workers pull: each long-polls ``next`` on the gateway, carrying the result of the run it
just finished, and gets its next run back in the same answer, so a busy worker costs one
HTTP request per run. The pool starts workers as its queue grows (up to ``max_workers``),
lets surplus ones go after ``worker_idle`` seconds and the last one after ``pool_idle``
seconds (scale to zero). It also enforces each run's timeout and reports workers that die.

Groups: when a map keeps every worker the pool may have busy and its queue is longer than its
workers, a worker's ``next`` takes several of its queued runs at once (``GroupLease``). The worker
runs them in order and streams each result back as it finishes (``group_done``), so the run in hand
is always known: its timeout timer and a cancel act on it alone; a cancelled run not yet started is
skipped; when the worker dies, the runs it had not started go back to the queue, no retry spent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from opbox.errors import AuthError

from .base import EXIT, IDLE, SKIPPED, Completion, GroupLease, Lease, PoolSize, RunEvents, RunTicket, VersionInfo
from .fairshare import FairShare

log = logging.getLogger("opbox.pools")
MAX_GROUP = 32  # runs a worker takes at once, at most (only when its pool's queue outnumbers the workers)
GROUP_AFTER = 2  # runs per worker a pool runs one at a time first (whether they call other jobs shows then)
GROUP_SPAN = 0.25  # seconds of its pool's recent runs a group may hold (OPBOX_GROUP_SPAN): while runs take about as
# long as their recent ones, none waits longer than that in one worker's hands while another could have taken it
RUN_TIME_WEIGHT = 0.1  # of a faster run in a pool's estimate of its runs' time (a slower one counts in full)
HANDED_BACK = "requeued: its worker ended before starting it"
STOP_GROUP = "*stop"  # in a worker's answer from cancelled_in_group: start no other run of the group


@dataclass
class Worker:
    id: str
    pool: "Pool"
    handle: "WorkerHandle | None" = None  # the spawner's process (or container)
    polled: bool = False
    run_id: str | None = None
    timer: asyncio.TimerHandle | None = None
    kill_reason: tuple[str, str] | None = None  # (status, reason) when the platform killed it
    token: str = ""  # its own random bearer token: handed to its process once at spawn, then forgotten
    token_hash: bytes = b""  # what the gateway keeps to check it (SHA-256)
    generation: int = 0  # the pool's generation it was started in
    lease_timeout: float | None = None  # the timeout of the run it holds
    lease_traceparent: str | None = None  # and its traceparent
    group: deque = field(default_factory=deque)  # a group's tickets not handed in yet; the first is in hand
    held_at: float = 0.0  # when the run in hand came into it (monotonic)
    cancelled: set = field(default_factory=set)  # runs of its group cancelled meanwhile (it asks which)


@dataclass
class Pool:
    version: VersionInfo
    queue: deque = field(default_factory=deque)
    parked: deque = field(default_factory=deque)  # futures of workers waiting for a run
    workers: dict = field(default_factory=dict)
    last_active: float = field(default_factory=time.monotonic)
    warm: int = 1  # workers kept while idle, until pool_idle passes
    failed_starts: int = 0  # workers in a row that died before asking for work
    generation: int = 0  # bumped when the version's secrets change: older workers leave at their next poll
    started: int = 0  # workers started, ever (the platform's metrics: cold starts)
    calls_out: bool = False  # its runs call other jobs with the worker's token: never in groups (see held_run)
    singles: int = 0  # runs its workers ran one at a time: groups only once each has run some that way
    run_seconds: float | None = None  # its runs' time in a worker's hands: what groups are sized by

    def ran(self, seconds: float, runs: int = 1) -> None:
        """``runs`` runs took ``seconds`` each in a worker's hands. The estimate rises at once (slower runs
        make smaller groups from the next lease on) and falls as a moving average (a few fast ones do not)."""
        last = self.run_seconds
        if last is None or seconds >= last:
            self.run_seconds = seconds
        else:
            self.run_seconds = seconds + (last - seconds) * (1 - RUN_TIME_WEIGHT) ** runs

    @property
    def id(self) -> str:
        return self.version.key

    @property
    def starting(self) -> int:
        return sum(1 for w in self.workers.values() if not w.polled)


class WorkerHandle(Protocol):
    pid: int

    async def wait(self) -> int:
        """The exit code once the worker has ended (negative: killed by that signal)."""

    def output_tail(self, size: int = 4000) -> str:
        """The end of the worker's output, for the reason of a start that failed."""


class Spawner(Protocol):
    """Starts workers. It may also have ``identity(pool) -> (worker id, token)`` for the next worker it
    will be asked to spawn (the kubernetes backend: a pod of the pool's Job, named by its index, with
    the Job's token); without it, a worker gets a random id and a token of its own. ``interrupts``
    False: a signal ends the worker (a pod is deleted), so its workers never hold groups (a group's
    cancels and the platform's stop are SIGUSR1 to a worker that goes on)."""

    async def spawn(self, worker: Worker) -> WorkerHandle:
        """Start a worker process (or container) for ``worker.pool``; return its handle."""

    def signal(self, worker: Worker, signum: int) -> None: ...


def file_tail(path, size: int = 4000) -> str:
    """The last ``size`` bytes of a worker's own output file, as text ("" if unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "worker ended"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"worker process killed by {name}"
    return f"worker process exited with code {returncode}"


class PoolManager:
    def __init__(self, spawner: Spawner, *, max_workers: int, worker_idle: float, pool_idle: float,
                 max_running: int | None = None, items_per_worker: int = 1, keep_warm: int = 1,
                 group_span: float = GROUP_SPAN) -> None:
        self.fair = FairShare(max_running or max_workers)
        self.spawner = spawner
        # whether its workers may hold a group of runs, and how many seconds of runs (0: never)
        self.groups = getattr(spawner, "interrupts", True) and group_span > 0
        self.group_span = group_span
        self.max_workers = max_workers
        # queued runs per worker started: 1 starts a worker per waiting run (processes are cheap);
        # a cluster's pods cost seconds each, so there a worker is started per this many
        self.items_per_worker = max(1, items_per_worker)
        self.keep_warm = keep_warm  # workers a new pool keeps while idle, until pool_idle passes
        self.worker_idle = worker_idle
        self.pool_idle = pool_idle
        self.pools: dict[str, Pool] = {}
        self.events: RunEvents | None = None
        self._by_run: dict[str, Worker] = {}
        self._tasks: set[asyncio.Task] = set()
        self.closing = False

    # -- platform side -----------------------------------------------------------------
    def pool(self, version: VersionInfo) -> Pool:
        pool = self.pools.get(version.key)
        if pool is None:
            pool = self.pools[version.key] = Pool(version=version, warm=self.keep_warm)
        elif pool.version.secret_env != version.secret_env:  # new workers get the new values; old ones leave
            pool.version = version
            pool.generation += 1
            for fut in pool.parked:
                if not fut.done():
                    fut.set_result(None)
        return pool

    def submit(self, ticket: RunTicket, version: VersionInfo) -> None:
        pool = self.pool(version)
        pool.last_active = time.monotonic()
        while pool.parked:
            fut = pool.parked.popleft()
            if not fut.done():
                fut.set_result(ticket)
                return
        pool.queue.append(ticket)
        self._scale(pool)

    def warm_up(self, version: VersionInfo, count: int = 1) -> None:
        pool = self.pool(version)
        for _ in range(max(0, min(count, self.max_workers) - len(pool.workers))):
            self._start_worker(pool)

    def retire(self, keep: set[str]) -> None:
        """Let pools not in ``keep`` scale to zero once idle."""
        for pool in self.pools.values():
            if pool.id not in keep:
                pool.warm = 0

    async def cancel(self, run_id: str, grace: float) -> None:
        worker = self._by_run.get(run_id)
        if worker is None:
            return  # queued runs are skipped at lease time (run_started says no)
        if worker.group:  # it asks which of its group's runs are cancelled: it stops the one in hand, skips the rest
            worker.cancelled.add(run_id)
            self.spawner.signal(worker, signal.SIGUSR1)
            await asyncio.sleep(grace)
            if worker.run_id == run_id and worker.handle is not None and worker.id in worker.pool.workers:
                worker.kill_reason = ("cancelled", "cancelled by request")
                self.spawner.signal(worker, signal.SIGKILL)
            return
        # SIGUSR1 cancels the run in hand (the runtime raises in the user's code, so finally blocks run,
        # and ignores it between runs); the kill after the grace only if the worker still holds this
        # lease: a worker that has moved on to another run must not lose that one
        worker.kill_reason = ("cancelled", "cancelled by request")
        self.spawner.signal(worker, signal.SIGUSR1)
        await asyncio.sleep(grace)
        if worker.run_id == run_id and worker.handle is not None and worker.id in worker.pool.workers:
            self.spawner.signal(worker, signal.SIGKILL)

    def release_parked(self) -> None:
        """Answer every parked worker now (with EXIT): the platform is stopping. A worker holding a group
        finishes its run in hand and starts no other (it asks, ``cancelled_in_group``, on SIGUSR1): they
        stay queued for the next start."""
        self.closing = True
        for pool in self.pools.values():
            for fut in pool.parked:
                if not fut.done():
                    fut.set_result(None)
            for worker in pool.workers.values():
                if len(worker.group) > 1:
                    self.spawner.signal(worker, signal.SIGUSR1)

    async def close(self) -> None:
        self.release_parked()
        for pool in self.pools.values():
            for worker in list(pool.workers.values()):
                self.spawner.signal(worker, signal.SIGTERM)
        for task in list(self._tasks):
            task.cancel()

    @property
    def leased(self) -> int:
        """Runs in the hands of this manager's workers now."""
        return len(self._by_run)

    def describe(self, workspace: str) -> list[dict]:
        """The pools of ``workspace``'s job versions."""
        return [
            {
                "pool": p.id, "job_id": p.version.job_id, "version": p.version.version, "queued": len(p.queue),
                "workers": len(p.workers), "busy": sum(1 for w in p.workers.values() if w.run_id),
                "held": sum(len(w.group) or (w.run_id is not None) for w in p.workers.values()),
            }
            for p in self.pools.values() if p.version.workspace == workspace
        ]

    def sizes(self) -> list[PoolSize]:
        """Every pool's workers, busy ones, queued runs and workers started (the platform's metrics)."""
        return [PoolSize(p.version.workspace, p.version.job_name, len(p.workers),
                         sum(1 for w in p.workers.values() if w.run_id), len(p.queue), p.started)
                for p in self.pools.values()]

    # -- worker side (called by the gateway's internal routes) --------------------------
    def find(self, pool_id: str, worker_id: str, token: str) -> Worker | None:
        """The worker ``worker_id`` of the pool, if the platform still has it (None: it should exit), once
        ``token`` proves the caller is that worker: a token is one worker's, so no process can take or end
        another worker's runs, not even one of the same pool."""
        pool = self.pools.get(pool_id)
        worker = pool.workers.get(worker_id) if pool else None
        if worker is not None and not hmac.compare_digest(hashlib.sha256(token.encode()).digest(), worker.token_hash):
            raise AuthError("invalid worker token")
        return worker

    async def next(self, worker: Worker, done: Completion | None, wait: float) -> Lease | GroupLease | str:
        worker.polled = True
        worker.pool.failed_starts = 0
        if done is not None:
            self._complete(worker, done)
        if worker.run_id is not None:  # it asks again without handing that run in: our answer never reached it
            return self._lease_again(worker)
        pool = worker.pool
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not self.closing:
            if worker.generation != pool.generation:  # started with secrets that have changed since
                pool.workers.pop(worker.id, None)
                self._scale(pool)
                return EXIT
            ticket = pool.queue.popleft() if pool.queue else None
            if ticket is None:
                if self._should_exit(pool, worker):
                    return EXIT
                fut = loop.create_future()
                pool.parked.append(fut)
                try:
                    await asyncio.wait({fut}, timeout=max(0.0, deadline - loop.time()))
                finally:
                    if not fut.done():
                        fut.cancel()
                ticket = fut.result() if not fut.cancelled() else None
                if ticket is None:
                    return IDLE if not self.closing else EXIT
            if pool.workers.get(worker.id) is not worker:  # it died while it asked (its end is settled already)
                pool.queue.appendleft(ticket)
                self._scale(pool)
                return EXIT
            lease = self._lease(worker, ticket)
            if lease is not None:
                return lease
        return EXIT

    def worker_exited(self, worker: Worker, returncode: int | None, output: str = "") -> None:
        pool = worker.pool
        pool.workers.pop(worker.id, None)
        if worker.timer:
            worker.timer.cancel()
        if worker.run_id is not None:
            self._hand_back(worker)
            self._by_run.pop(worker.run_id, None)
            status, reason = worker.kill_reason or ("failed", describe_exit(returncode))
            self.events.run_lost(worker.run_id, reason, status)
            worker.run_id = None
            self._release(pool.version.workspace)
        if self.closing:
            return
        pool.failed_starts = 0 if worker.polled else pool.failed_starts + 1
        if pool.failed_starts >= 3:  # broken environment: fail what waits rather than respawn forever
            reason = f"{describe_exit(returncode)} before taking work, 3 times in a row"
            if output:
                reason += f"; its output ends with:\n{output[-2000:]}"
            self._fail_queue(pool, reason)
            pool.failed_starts = 0
            return
        self._scale(pool)

    def worker_disrupted(self, worker: Worker, reason: str) -> None:
        """The worker's pod was disrupted (evicted, its node lost): its run goes back to the queue
        (``RunEvents.run_disrupted``) without spending a retry, before the worker is reported gone."""
        run_id = worker.run_id
        if run_id is None:
            return
        if worker.timer:
            worker.timer.cancel()
        self._hand_back(worker)
        self._by_run.pop(run_id, None)
        worker.run_id = None
        self._release(worker.pool.version.workspace)
        self.events.run_disrupted(run_id, reason)

    def _fail_queue(self, pool: Pool, reason: str) -> None:
        while pool.queue and not any(w.polled for w in pool.workers.values()):
            self.events.run_lost(pool.queue.popleft().run_id, reason)

    def kill(self, worker: Worker, status: str, reason: str) -> None:
        """End a worker because of its current run (timeout, memory limit)."""
        if worker.kill_reason is None:
            worker.kill_reason = (status, reason)
        self.spawner.signal(worker, signal.SIGKILL)

    # -- internals ---------------------------------------------------------------------
    def _lease(self, worker: Worker, ticket: RunTicket) -> Lease | GroupLease | None:
        if not self.fair.admit(ticket):  # its workspace is at its share: it waits in FairShare
            return None
        extra = self._group_extra(worker.pool, ticket)
        if extra:
            return self._lease_group(worker, [ticket, *extra])
        if not self.events.run_started(ticket.run_id, worker.id, pooled=True):
            self._release(ticket.workspace)
            return None
        args = self.events.run_args(ticket.run_id)
        if args is None:
            self._release(ticket.workspace)
            self.events.run_lost(ticket.run_id, "arguments missing from the store")
            return None
        worker.kill_reason = None
        self._by_run[ticket.run_id] = worker
        self._hold(worker, ticket)
        return Lease.of(ticket, args)

    def _group_extra(self, pool: Pool, ticket: RunTicket) -> list[RunTicket]:
        """More queued runs (a map's items, calls) for the worker taking ``ticket``: only while every worker the
        pool may have is there and none waits for work (latency first), and its queue outnumbers them; as many
        as their share of the queue, at most MAX_GROUP and as many as its recent runs take ``group_span`` seconds
        (runs longer than half of it never come in groups), each counted by FairShare (taken only while no other
        workspace has work)."""
        if not self.groups or pool.calls_out or pool.parked or len(pool.workers) < self.max_workers \
                or pool.starting or pool.singles < GROUP_AFTER * len(pool.workers) or not pool.run_seconds:
            return []
        count = min(MAX_GROUP - 1, (len(pool.queue) - 1) // len(pool.workers), int(self.group_span / pool.run_seconds) - 1)
        extra: list[RunTicket] = []
        queue = pool.queue
        while len(extra) < count and queue and self.fair.admit_extra(queue[0]):
            extra.append(queue.popleft())
        return extra

    def _lease_group(self, worker: Worker, tickets: list[RunTicket]) -> Lease | GroupLease | None:
        """Start ``tickets`` (the first admitted as any run, the others as FairShare's extras) in one go and hand
        them to ``worker``: a ``GroupLease``, or a plain ``Lease`` when only one could start."""
        workspace = worker.pool.version.workspace
        started = [t for t, ok in zip(tickets, self.events.runs_started(tickets, worker.id)) if ok]
        args = self.events.runs_args([t.run_id for t in started]) if started else {}
        group = []
        for ticket in started:
            if ticket.run_id in args:
                group.append(ticket)
            else:
                self.events.run_lost(ticket.run_id, "arguments missing from the store")
        for _ in range(len(tickets) - max(1, len(group))):  # the group is one run in progress and its extras
            self._release_extra(workspace)
        if not group:
            self._release(workspace)
            return None
        worker.kill_reason = None
        for ticket in group:
            self._by_run[ticket.run_id] = worker
        self._hold(worker, group[0])
        if len(group) == 1:
            return Lease.of(group[0], args[group[0].run_id])
        worker.group = deque(group)
        worker.cancelled = set()
        return GroupLease.of(group, args)

    def _hold(self, worker: Worker, ticket: RunTicket) -> None:
        """``ticket``'s run is the one in the worker's hands now: its timeout runs from here."""
        worker.run_id, worker.held_at = ticket.run_id, time.monotonic()
        if ticket.timeout:
            worker.timer = asyncio.get_running_loop().call_later(
                ticket.timeout, self.kill, worker, "timed_out", f"timed out after {ticket.timeout:g} s"
            )
        worker.lease_timeout, worker.lease_traceparent = ticket.timeout, ticket.traceparent

    def group_done(self, worker: Worker, dones) -> None:
        """Results of the worker's group, in its order: recorded together (one transaction); the next run of the
        group is in hand from now. A result for another run than the one in hand is ignored (a late one)."""
        group, ends, skipped, left = worker.group, [], [], 0
        for done in dones:
            if not group or group[0].run_id != done.run_id:
                log.warning("ignoring a result for %s from %s: not its run in hand", done.run_id, worker.id)
                continue
            ticket = group.popleft()
            self._by_run.pop(ticket.run_id, None)
            left += 1
            if done.outcome != SKIPPED:
                ends.append((ticket, done.outcome, done.payload))
            elif ticket.run_id not in worker.cancelled:  # not started (the platform stops): queued again
                skipped.append(ticket.run_id)
            worker.cancelled.discard(ticket.run_id)
        if not left:
            return
        if worker.timer:
            worker.timer.cancel()
            worker.timer = None
        worker.run_id = None
        now = worker.pool.last_active = time.monotonic()
        worker.pool.ran((now - worker.held_at) / left, left)  # the runs of this read, one after the other
        if group:
            worker.kill_reason = None
            self._hold(worker, group[0])
        if ends:
            self.events.runs_finished(ends)
        workspace = worker.pool.version.workspace
        for run_id in skipped:
            self.events.run_disrupted(run_id, HANDED_BACK)
        for _ in range(left if group else left - 1):  # runs behind the one in hand left the group
            self._release_extra(workspace)
        if not group:
            self._release(workspace)

    def cancelled_in_group(self, worker: Worker) -> list[str]:
        """The group's cancelled runs, and STOP_GROUP when the platform is stopping: start no other run of it."""
        return [*sorted(worker.cancelled), *((STOP_GROUP,) if self.closing else ())]

    def _hand_back(self, worker: Worker) -> None:
        """The worker is gone: the runs of its group behind the one in hand were never started; they go back
        to the queue without spending a retry (``run_disrupted``). The one in hand ends as a single run would."""
        group, worker.group = worker.group, deque()
        workspace = worker.pool.version.workspace
        for ticket in list(group)[1:]:
            self._by_run.pop(ticket.run_id, None)
            self._release_extra(workspace)
            self.events.run_disrupted(ticket.run_id, HANDED_BACK)

    def _lease_again(self, worker: Worker) -> Lease | GroupLease | str:
        """The run a worker holds, handed to it again (the answer that leased it was lost on the way: a
        reset connection the worker's channel retried). Never a second run while it holds one: the first
        would stay running with no one working on it. A group is handed again as it is left."""
        if worker.group:
            args = self.events.runs_args([t.run_id for t in worker.group])
            if all(t.run_id in args for t in worker.group):
                return GroupLease.of(worker.group, args)
            self._hand_back(worker)  # some are gone meanwhile: the others are queued again, it keeps the one in hand
        args = self.events.run_args(worker.run_id)
        if args is None:  # expired or gone meanwhile: the run cannot be done
            run_id, worker.run_id = worker.run_id, None
            self._by_run.pop(run_id, None)
            self.events.run_lost(run_id, "arguments missing from the store")
            self._release(worker.pool.version.workspace)
            return IDLE
        return Lease(worker.run_id, args, worker.lease_timeout, worker.lease_traceparent)

    def _complete(self, worker: Worker, done: Completion) -> None:
        if worker.run_id != done.run_id:
            log.warning("ignoring a result for %s from %s: not its current run", done.run_id, worker.id)
            return
        if worker.timer:
            worker.timer.cancel()
            worker.timer = None
        self._by_run.pop(done.run_id, None)
        worker.run_id = None
        now = worker.pool.last_active = time.monotonic()
        worker.pool.singles += 1
        worker.pool.ran(now - worker.held_at)
        self.events.run_finished(done.run_id, done.outcome, done.payload, done.error_type)
        self._release(worker.pool.version.workspace)

    def _release_extra(self, workspace: str) -> None:
        for ticket in self.fair.release_extra(workspace):
            pool = self.pools.get(f"{ticket.job_id}.v{ticket.version}")
            if pool is not None:
                self.submit(ticket, pool.version)

    def _release(self, workspace: str) -> None:
        """A run's slot in its workspace's share is free: start what was waiting for one."""
        for ticket in self.fair.release(workspace):
            pool = self.pools.get(f"{ticket.job_id}.v{ticket.version}")
            if pool is not None:
                self.submit(ticket, pool.version)

    def _should_exit(self, pool: Pool, worker: Worker) -> bool:
        idle = time.monotonic() - pool.last_active
        if idle >= self.pool_idle or (pool.warm == 0 and idle >= self.worker_idle):
            leave = True
        else:
            leave = idle >= self.worker_idle and len(pool.workers) > pool.warm
        if leave:
            pool.workers.pop(worker.id, None)
        return leave

    def _scale(self, pool: Pool) -> None:
        if self.closing:  # stopping: what is queued stays queued (durably) for the next start
            return
        missing = -(-len(pool.queue) // self.items_per_worker) - len(pool.parked) - pool.starting
        room = self.max_workers - len(pool.workers)
        for _ in range(max(0, min(missing, room))):
            self._start_worker(pool)

    def _start_worker(self, pool: Pool) -> None:
        identity = getattr(self.spawner, "identity", None)  # a spawner may name its workers (a Job's pods)
        worker_id, token = identity(pool) if identity else (f"w{time.monotonic_ns():x}", secrets.token_urlsafe(32))
        worker = Worker(id=worker_id, pool=pool, token=token,
                        token_hash=hashlib.sha256(token.encode()).digest(), generation=pool.generation)
        pool.workers[worker.id] = worker
        pool.started += 1
        task = asyncio.ensure_future(self._run_worker(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_worker(self, worker: Worker) -> None:
        returncode = None
        try:
            try:
                worker.handle = await self.spawner.spawn(worker)
            finally:
                worker.token = ""  # the process has it; the platform keeps only its hash
            returncode = await worker.handle.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # could not start: fail what waits, don't spin
            log.error("worker for %s could not start: %s", worker.pool.id, exc)
            worker.pool.workers.pop(worker.id, None)
            self._fail_queue(worker.pool, f"worker could not start: {exc}")
            return
        self.worker_exited(worker, returncode, worker.handle.output_tail())


class PoolMethods:
    """The ``WorkerPools`` ability, for backends whose runs go to a ``PoolManager`` (``pools``).
    ``next_run`` hands back the manager's own coroutine: no extra frame on the hot path."""

    pools: PoolManager

    def find_worker(self, pool_id: str, worker_id: str, token: str) -> Worker | None:
        return self.pools.find(pool_id, worker_id, token)

    def next_run(self, worker: Worker, done: Completion | None, wait: float):
        return self.pools.next(worker, done, wait)

    def group_done(self, worker: Worker, dones) -> None:
        self.pools.group_done(worker, dones)

    def cancelled_in_group(self, worker: Worker) -> list[str]:
        return self.pools.cancelled_in_group(worker)

    def release_parked(self) -> None:
        self.pools.release_parked()

    def busy(self) -> int:
        return self.pools.leased

    def pool_sizes(self) -> list[PoolSize]:
        return self.pools.sizes()

    def held_run(self, pool_id: str, worker_id: str, token: str,
                 claimed: str | None = None) -> tuple[str, str, float | None] | None:
        worker = self.pools.find(pool_id, worker_id, token)
        if worker is None or worker.run_id is None:
            return None
        # the pool's runs call other jobs: it hands out no more groups (one run at a time keeps the gateway's
        # account of the run in hand current for the timeouts of their children too)
        worker.pool.calls_out = True
        if claimed is not None and claimed != worker.run_id:
            # in a group the gateway learns which run is in hand one result late at worst: the run the worker's
            # code names is its parent when it is one of the worker's (its timer starts with that result)
            ticket = next((t for t in worker.group if t.run_id == claimed), None)
            if ticket is not None:
                return worker.pool.version.workspace, claimed, ticket.timeout
        left = worker.timer.when() - asyncio.get_running_loop().time() if worker.timer is not None else None
        return worker.pool.version.workspace, worker.run_id, left

