"""Workspace secrets: named sets of KEY=VALUE, encrypted at rest, given to runs as environment variables.

Values are encrypted with Fernet (``cryptography``: AES-128-CBC + HMAC-SHA256) under a key kept in
a file of its own (``OPBOX_SECRETS_KEY_FILE``, default ``OPBOX_HOME/secrets.key``, mode 0600), apart
from the state file, so a copy of ``state.db`` alone reveals no value. Values leave this module only
as the environment of a job version's processes (``env``): no route returns them, no log line or
error message names them, and versions record the secrets' names only.

A backend that keeps secrets as objects of its own (``MirrorsSecrets``: the kubernetes backend's
Kubernetes Secrets) hears of every set and delete before the record changes, so a refusal by the
cluster leaves both as they were; at start (``sync``) it is given every secret, to catch up.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable

from cryptography.fernet import Fernet, InvalidToken

from opbox.errors import ConfigError, MissingSecret, NotFound, ValidationError
from opbox.resource import SECRET_NAME

from ..backends.base import MirrorsSecrets
from ..records.base import Records, SecretRecord

log = logging.getLogger("opbox.secrets")

ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
RESERVED = ("OPBOX_",)  # the runtime's own variables: a secret may not replace them
MAX_BYTES = 64 * 1024  # per secret, keys and values together


def load_key(path: Path) -> bytes:
    """The Fernet key in ``path``, made (0600) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it meanwhile
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key())
    key = path.read_bytes().strip()
    try:
        Fernet(key)
    except ValueError:
        raise ConfigError(f"{path} is not a secrets key (32 url-safe base64-encoded bytes)") from None
    return key


class Secrets:
    def __init__(self, records: Records, key: bytes, on_change: Callable[[str], None] = lambda workspace: None,
                 mirror: MirrorsSecrets | None = None):
        self.records = records
        self.fernet = Fernet(key)
        self.on_change = on_change  # a workspace's secrets changed: versions resolved before are stale
        self.mirror = mirror  # the backend, when it keeps secrets as objects of its own

    async def set(self, workspace: str, name: str, values: dict) -> SecretRecord:
        if not isinstance(name, str) or not SECRET_NAME.fullmatch(name):
            raise ValidationError("a secret's name is 1-63 lowercase letters, digits, '-' and '_'")
        if not isinstance(values, dict) or not values:
            raise ValidationError("a secret needs at least one KEY=VALUE")
        for key, value in values.items():
            if not isinstance(key, str) or not ENV_KEY.fullmatch(key) or key.startswith(RESERVED):
                raise ValidationError(f"{key!r} cannot be an environment variable's name (letters, digits and _, "
                                      "not starting with a digit nor OPBOX_)")
            if not isinstance(value, str) or "\0" in value:
                raise ValidationError(f"the value of {key} must be a string without NUL characters")
        data = json.dumps(values).encode()
        if len(data) > MAX_BYTES:
            raise ValidationError(f"secret {name} is {len(data)} bytes; the limit is {MAX_BYTES}")
        if self.mirror is not None:  # first: a refusal leaves the record as it was
            await self.mirror.put_secret(workspace, name, dict(values))
        now = time.time()
        self.records.secrets.put(SecretRecord(workspace, name, tuple(sorted(values)), self.fernet.encrypt(data),
                                              now, now))
        self.on_change(workspace)
        return self.records.secrets.get(workspace, name)

    def list(self, workspace: str) -> list[SecretRecord]:
        return self.records.secrets.in_workspace(workspace)

    async def delete(self, workspace: str, name: str) -> None:
        if self.records.secrets.get(workspace, name) is None:
            raise NotFound(f"no secret {name!r} in workspace {workspace}")
        if self.mirror is not None:
            await self.mirror.delete_secret(workspace, name)
        self.records.secrets.delete(workspace, name)
        self.on_change(workspace)

    async def sync(self) -> None:
        """Give the mirroring backend every secret (set while it was down, or before it was chosen).
        One that cannot be decrypted or is refused is logged (by name only) and skipped."""
        if self.mirror is None:
            return
        for row in self.records.secrets.all():
            try:
                await self.mirror.put_secret(row.workspace, row.name, self._values(row))
            except Exception as exc:
                log.warning("secret %s of workspace %s is not in the cluster: %s", row.name, row.workspace, exc)

    def check(self, workspace: str, names: tuple[str, ...]) -> None:
        """MissingSecret naming every secret of ``names`` the workspace lacks."""
        missing = [n for n in names if self.records.secrets.get(workspace, n) is None]
        if missing:
            raise MissingSecret(f"secret{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                                f"{'do' if len(missing) > 1 else 'does'} not exist in workspace {workspace}; "
                                f"create {'them' if len(missing) > 1 else 'it'} with `opbox secrets set "
                                f"{missing[0]} KEY=VALUE`", missing=missing)

    def env(self, workspace: str, names: tuple[str, ...]) -> dict[str, str]:
        """The variables of ``names``, in order (a later secret's key wins). MissingSecret if one is gone."""
        self.check(workspace, names)
        env: dict[str, str] = {}
        for name in names:
            env.update(self._values(self.records.secrets.get(workspace, name)))
        return env

    def _values(self, row: SecretRecord) -> dict[str, str]:
        try:
            return json.loads(self.fernet.decrypt(row.data))
        except InvalidToken:
            raise ConfigError(f"secret {row.name!r} cannot be decrypted with this platform's secrets key (was the "
                              "key file replaced?); set it again") from None
