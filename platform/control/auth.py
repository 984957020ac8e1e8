"""Bearer tokens: stored as SHA-256 hashes, each bound to one workspace.

A request may only touch the workspace its token belongs to. A token of another
workspace gets 404, as if the workspace did not exist, so nothing about it leaks.

Callers' tokens (``obc_...``, ``backends/base.py``) are what the SDK in user code sends back to its own
workspace: never stored, derived from the platform's secret (a one-shot run's, a service's) or from a warm
worker's own token, and valid only while that run runs (while that service exists). Their role is
``run`` (``service`` for a replica's): the gateway lets them call, map, trigger, read and cancel runs and
call services, nothing else (``gateway/app.CALLER_ROUTES``).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from typing import Callable

from opbox.errors import AuthError, Forbidden, NotFound, QuotaExceeded

from ..backends.base import CALLER_PREFIX
from ..ids import check_workspace, new_id
from ..records.base import Records, TokenRecord

CALLER_ROLES = ("run", "service")
# the notices several gateways send each other (``Auth.publish``): a token was revoked; a service was deleted
TOKENS_REVOKED = "tokens:revoked"
SERVICE_DELETED = "service-deleted:"
HeldRun = Callable[[str, str, str, "str | None"], "tuple[str, str, float | None] | None"]  # WorkerPools.held_run

TOKEN_PREFIX = "obx_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class RateLimit:
    """A token bucket per bearer token: ``rate`` requests a second on average, bursts up to ``burst``;
    beyond, 429 with the seconds until one fits (one workspace's flood costs the others little)."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, max(burst, 1.0)
        self._buckets: dict[str, list[float]] = {}  # token hash -> [tokens left, when counted]

    def take(self, key: str, name: str) -> None:
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [self.burst, now]
        left = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if left < 1.0:
            bucket[0] = left
            wait = max(1, math.ceil((1.0 - left) / self.rate))
            raise QuotaExceeded(f"token {name!r} sent more than {self.rate:g} requests a second (bursts up to "
                                f"{self.burst:g}); retry in {wait} s", retry_after=wait)
        bucket[0] = left - 1.0


class Auth:
    def __init__(self, records: Records, secret: bytes, rate_limit: RateLimit | None = None):
        self.records = records
        self.secret = secret
        self.rate_limit = rate_limit
        self._cache: dict[str, TokenRecord] = {}
        self._digests: dict[str, str] = {}  # bearer token -> its hash, for tokens found active (not callers')
        self.held_run: HeldRun | None = None  # the backend's warm workers (core sets it when it has them)
        self._run_callers: dict[str, str] = {}  # run id -> the digest of its caller token, cached while it runs
        self.service_exists: Callable[[str, str], bool] = lambda ws, name: records.services.get(ws, name) is not None
        # several gateways on one database: tells the others what they must forget (``core`` sets it)
        self.publish: Callable[[str], None] | None = None

    def create_token(self, workspace: str, name: str = "default", role: str = "admin", token: str | None = None) -> tuple[str, str]:
        check_workspace(workspace)
        token = token or new_token()
        token_id = new_id("t")
        self.records.tokens.add(token_id, workspace, name, hash_token(token), role)
        return token_id, token

    def revoke(self, workspace: str, token_id: str) -> None:
        if not self.records.tokens.revoke(workspace, token_id, time.time()):
            raise NotFound(f"no active token {token_id} in workspace {workspace}")
        self.forget_cached()
        if self.publish is not None:
            self.publish(TOKENS_REVOKED)

    def forget_cached(self) -> None:
        """Read every token from the records again at its next use (one was revoked, maybe on another
        gateway; or, several gateways sharing the records, every few seconds in case a notice was lost)."""
        self._cache.clear()
        self._run_callers.clear()

    def tokens(self, workspace: str) -> list[TokenRecord]:
        """The workspace's tokens, oldest first, revoked ones included."""
        return self.records.tokens.in_workspace(workspace)

    def identify(self, token: str) -> TokenRecord | None:
        """The active token with this value, whatever its workspace (the dashboard's login form); rate
        limited like any request with it. None for an unknown or revoked one."""
        token = token.strip()
        if not token or len(token) > 200:
            return None
        digest = hash_token(token)
        row = self.records.tokens.by_hash(digest)
        if row is not None and self.rate_limit is not None:
            self.rate_limit.take(digest, row.name)
        return row

    def active(self, workspace: str, token_id: str) -> TokenRecord | None:
        """The workspace's token ``token_id`` if it is not revoked (a dashboard session's)."""
        return next((t for t in self.tokens(workspace) if t.id == token_id and t.revoked_at is None), None)

    def is_active(self, token: str) -> bool:
        return self.records.tokens.by_hash(hash_token(token)) is not None

    def is_revoked(self, token: str) -> bool:
        row = self.records.tokens.by_hash(hash_token(token), revoked_too=True)
        return row is not None and row.revoked_at is not None

    def has_tokens(self, workspace: str) -> bool:
        return bool(self.records.tokens.in_workspace(workspace))

    def workspace_exists(self, workspace: str) -> bool:
        return self.records.tokens.workspace_exists(workspace)

    def check(self, authorization: str | None, workspace: str, caller_run: str | None = None) -> TokenRecord:
        """The token for a request to ``workspace``; raises AuthError or NotFound. ``caller_run``: the run the
        request says its code runs in (``X-Opbox-Caller-Run``), which a warm worker's token stands for when the
        worker holds it (a group's run in hand, which the gateway may learn one result late)."""
        if not authorization:
            raise AuthError("missing bearer token: send 'Authorization: Bearer <OPBOX_TOKEN>'")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 200:
            raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
        digest = self._digests.get(token)  # a sha256 saved per request: the hash of a token never changes
        if digest is None:
            digest = hash_token(token)
        row = self._cache.get(digest)
        if row is None:
            if token.startswith(CALLER_PREFIX):
                row = self._caller(token, digest, caller_run)
            else:
                row = self.records.tokens.by_hash(digest)
                if row is None:
                    raise AuthError("invalid or revoked token")
                self._cache[digest] = row
                if len(self._digests) >= 10_000:  # bounded whatever the number of tokens
                    self._digests.clear()
                self._digests[token] = digest
        if row.workspace != workspace:
            if row.role in CALLER_ROLES:  # the same answer whether that workspace exists or not
                raise Forbidden(f"a {row.role}'s own token is valid for its workspace {row.workspace} only")
            raise NotFound(f"no workspace {workspace!r}")
        if self.rate_limit is not None:
            self.rate_limit.take(digest, row.name)
        return row

    # -- tokens for the platform's own processes (workers, batch runs) -----------------
    def internal_token(self, scope: str) -> str:
        return hmac.new(self.secret, scope.encode(), hashlib.sha256).hexdigest()

    def check_internal(self, authorization: str | None, scope: str) -> None:
        token = (authorization or "").partition(" ")[2].strip()
        if not token or not hmac.compare_digest(token, self.internal_token(scope)):
            raise AuthError("invalid internal token")

    # -- callers' tokens (jobs calling jobs) ------------------------------------------------
    def _caller(self, token: str, digest: str, caller_run: str | None = None) -> TokenRecord:
        """The record of a caller's token, or AuthError. A one-shot run's and a service's are cached until
        the run ends (``run_ended``) or the service goes (``service_deleted``); a warm worker's is asked of
        its pool each time (in memory), since the run it holds changes."""
        kind, _, rest = token[len(CALLER_PREFIX):].partition(":")
        if kind == "w" and self.held_run is not None:
            pool, worker, secret = (rest.split(":") + ["", "", ""])[:3]
            held = self.held_run(pool, worker, secret, caller_run)
            if held is None:
                raise AuthError("this token is a warm worker's: it is valid only while the worker runs a run")
            workspace, run_id, left = held
            return TokenRecord(f"run:{run_id}", workspace, f"run {run_id}", digest, "run", time.time(), None,
                               run_id, None if left is None else time.time() + left)
        subject, _, mac = rest.rpartition(":")
        if kind not in ("r", "s") or not subject or not hmac.compare_digest(
                mac, self.internal_token(f"call:{kind}:{subject}")):
            raise AuthError("invalid or revoked token")
        if kind == "s":
            workspace, _, name = subject.partition("/")
            if not self.service_exists(workspace, name):
                raise AuthError(f"this token was service {name}'s, which is gone")
            row = TokenRecord(f"service:{subject}", workspace, f"service {name}", digest, "service", time.time(), None)
        else:
            run = self.records.runs.get(subject)
            if run is None or run.status != "running":
                raise AuthError(f"this token was run {subject}'s, which is not running any more")
            deadline = run.started_at + run.timeout if run.timeout and run.started_at else None
            row = TokenRecord(f"run:{subject}", run.workspace, f"run {subject}", digest, "run", run.started_at or 0.0,
                              None, subject, deadline)
            self._run_callers[subject] = digest
        self._cache[digest] = row
        return row

    def run_ended(self, run_id: str) -> None:
        """The run ended (or went back to the queue): its caller token is revoked."""
        digest = self._run_callers.pop(run_id, None)
        if digest is not None:
            self._cache.pop(digest, None)

    def service_deleted(self, workspace: str, name: str, here: bool = True) -> None:
        """The service went (``here``: on this gateway, which tells the others): its replicas' caller token
        is revoked."""
        if here and self.publish is not None:
            self.publish(f"{SERVICE_DELETED}{workspace}/{name}")
        for digest, row in list(self._cache.items()):
            if row.role == "service" and row.id == f"service:{workspace}/{name}":
                del self._cache[digest]
