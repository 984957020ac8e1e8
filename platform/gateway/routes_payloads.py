"""Signed uploads of large payloads: the SDK puts an argument envelope straight into the object store and
the run's create request carries only a reference to it."""

from __future__ import annotations

from starlette.requests import Request

from .http import json_body, ok
from .routes_jobs import platform, workspace


async def create_payload_upload(request: Request):
    """
    summary: Ask where to upload a large argument envelope
    description: >
      Answers a signed, expiring URL to PUT the envelope to (with the given headers), straight into the
      object store, and its reference: the run's create request (POST /job/{job}/runs, /trigger, a map's
      items) then carries the body b"OPBR" + ref instead of the envelope. The reference is used once, by
      this workspace; its size (as stored) is checked against OPBOX_MAX_PAYLOAD and the workspace's
      storage quota when it is used. Unused uploads are deleted by the retention.
    requestBody:
      required: true
      content:
        application/json:
          schema: {type: object, required: [size], properties: {size: {type: integer, minimum: 0}}}
    responses:
      200: {description: '{"ref", "url", "method", "headers", "expires"}'}
      413: {description: Larger than OPBOX_MAX_PAYLOAD (payload_too_large)}
      507: {description: The workspace's storage quota is reached (storage_quota_exceeded)}
    """
    ws = workspace(request)
    plat = platform(request)
    size = (await json_body(request)).get("size")
    return ok(plat.payloads.upload_slot(ws, size, plat.settings.max_payload, "arguments", quota=plat.runs.check_quota))


async def create_file_upload(request: Request):
    """
    summary: Ask where to upload an opbox.File (or Dir) content, by its sha256
    description: >
      Answers exists=true when the workspace's store has that content already, else a signed, expiring URL
      to PUT it to (bound to that sha256 and size: another content is refused). Runs receive the hash only.
    requestBody:
      required: true
      content:
        application/json:
          schema: {type: object, required: [sha256, size], properties: {sha256: {type: string}, size: {type: integer}}}
    responses:
      200: {description: '{"key", "exists", "upload": {"url", "method", "headers"}}'}
      413: {description: Larger than OPBOX_MAX_PAYLOAD (payload_too_large)}
      507: {description: The workspace's storage quota is reached (storage_quota_exceeded)}
    """
    ws = workspace(request)
    plat = platform(request)
    body = await json_body(request)
    return ok(await plat.files.upload_slot(ws, body.get("sha256"), body.get("size"), quota=plat.runs.check_quota))


async def get_file(request: Request):
    """
    summary: Where to download an opbox.File (or Dir) content, by its sha256
    responses:
      200: {description: '{"url" (signed, expiring), "size"}'}
      404: {description: No such content in the workspace (never uploaded, or expired)}
    """
    ws = workspace(request)
    return ok(await platform(request).files.download(ws, request.path_params["sha256"]))
