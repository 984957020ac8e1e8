"""Browser sessions for the dashboard: a signed, expiring cookie naming the token that logged in.

The cookie holds ``workspace|token id|expiry|nonce`` and an HMAC of it under a key derived from the
platform's secret; it is HttpOnly, SameSite=Strict and Secure when the gateway's URL is https. It never
holds the token itself, and a revoked token ends its sessions at the next request (``Dashboard``
checks the token id). Each state-changing form carries a CSRF token: an HMAC of the session's nonce
(and the login form one of a short-lived cookie's value: double submit).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from typing import NamedTuple

COOKIE = "opbox_session"
LOGIN_COOKIE = "opbox_login"  # the login form's CSRF value (there is no session yet)


class Session(NamedTuple):
    workspace: str
    token_id: str
    expires: int
    nonce: str


class Sessions:
    def __init__(self, secret: bytes, ttl: float):
        self.key = hmac.new(secret, b"opbox dashboard sessions", hashlib.sha256).digest()
        self.ttl = ttl

    def _sign(self, text: str) -> str:
        return hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()

    def issue(self, workspace: str, token_id: str, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + self.ttl)
        body = f"{workspace}|{token_id}|{expires}|{self.new_nonce()}"
        return base64.urlsafe_b64encode(body.encode()).decode() + "." + self._sign(body)

    def read(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie names, or None when it is missing, forged or expired."""
        if not cookie or "." not in cookie or len(cookie) > 1024:
            return None
        encoded, _, signature = cookie.rpartition(".")
        try:
            body = base64.urlsafe_b64decode(encoded.encode()).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        workspace, token_id, expires, nonce = body.split("|")
        if int(expires) <= (time.time() if now is None else now):
            return None
        return Session(workspace, token_id, int(expires), nonce)

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_urlsafe(16)

    def csrf(self, nonce: str) -> str:
        """The CSRF token of forms in a session (or of the login form, for its cookie's value)."""
        return self._sign(f"csrf|{nonce}")

    def csrf_ok(self, nonce: str, sent: str | None) -> bool:
        return bool(sent) and hmac.compare_digest(sent, self.csrf(nonce))
