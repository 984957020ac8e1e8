"""``opbox.File`` / ``opbox.Dir`` contents: objects ``{workspace}/files/{sha256}``, uploaded once by the SDK or
the runtime with a signed URL bound to that hash (another content is refused), fetched with a signed URL.
The gateway never sees their bytes. They go with the retention once older than ``OPBOX_RETENTION_DAYS``
(a later use uploads the content again)."""

from __future__ import annotations

import asyncio
import re

from opbox.errors import NotFound, ValidationError

from .payloads import UPLOAD_EXPIRES, too_large

_SHA256 = re.compile(r"[0-9a-f]{64}")


def file_key(workspace: str, sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ValidationError("sha256 must be 64 lowercase hex digits")
    return f"{workspace}/files/{sha256}"


class Files:
    def __init__(self, payloads, limit: int):
        self.payloads, self.store, self.limit = payloads, payloads.store, limit

    async def upload_slot(self, workspace: str, sha256, size, internal: bool = False, quota=None) -> dict:
        """``exists``, or where to PUT the content (a URL bound to its hash and size)."""
        key = file_key(workspace, sha256)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValidationError(f"size must be a whole number of bytes, not {size!r}")
        if size > self.limit:
            raise too_large("file", size, self.limit)
        if await asyncio.to_thread(self.store.exists, key):
            return {"key": key, "exists": True}
        if quota is not None:
            quota(workspace, size)
        signed = self.store.upload_url(key, expires=UPLOAD_EXPIRES, max_size=size, sha256=sha256)
        return {"key": key, "exists": False, "upload": {"url": self.payloads.reachable(signed.url, internal),
                                                        "method": signed.method, "headers": dict(signed.headers)}}

    async def download(self, workspace: str, sha256: str, internal: bool = False) -> dict:
        key = file_key(workspace, sha256)
        size = await asyncio.to_thread(self.store.size, key)
        if size is None:
            raise NotFound(f"no file with sha256 {sha256} in workspace {workspace} (files expire with the "
                           "retention, OPBOX_RETENTION_DAYS: pass the File again to upload it)", sha256=sha256)
        url = self.store.download_url(key, expires=UPLOAD_EXPIRES).url
        return {"url": self.payloads.reachable(url, internal), "size": size}
