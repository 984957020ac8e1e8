"""Routes for runs (status, result, logs, cancel), tokens and the platform's status."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from opbox import envelope
from opbox.errors import Forbidden, Gone, ValidationError

from ..control.payloads import head_of
from ..ids import check_name
from ..records.base import TERMINAL
from .http import json_body, ok, query_number
from .render import SHUTTING_DOWN_LOG, attempt_json, run_json, token_json
from .routes_jobs import base_url, envelope_response, platform, workspace


async def get_run(request: Request):
    """
    summary: A run's status; with wait=S, holds the answer until the run ends or S seconds pass
    parameters:
      - {name: wait, in: query, schema: {type: number, minimum: 0, maximum: 300}}
    responses:
      200: {description: The run}
      404: {description: No such run}
    """
    ws = workspace(request)
    wait = query_number(request, "wait", 0.0, 0, 300)
    run = await platform(request).runs.wait(ws, request.path_params["run"], wait)
    return ok(run_json(run, base_url(request, ws)))


async def get_result(request: Request):
    """
    summary: A run's result
    description: >
      With Accept application/x-opbox-envelope, the raw result envelope (the SDK). Otherwise JSON:
      {"status", "result"} when the result is JSON-serializable, or {"status", "error": {type, message, traceback}}.
      202 with the run while it is not done.
    parameters:
      - {name: wait, in: query, schema: {type: number, minimum: 0, maximum: 300}}
    responses:
      200: {description: The result}
      202: {description: Not done yet}
    """
    ws = workspace(request)
    plat = platform(request)
    wait = query_number(request, "wait", 0.0, 0, 300)
    run = await plat.runs.wait(ws, request.path_params["run"], wait)
    if run.status not in TERMINAL:
        return JSONResponse(run_json(run, base_url(request, ws)), status_code=202)
    expired(run, "result")
    if envelope.CONTENT_TYPE in request.headers.get("accept", ""):
        return await envelope_response(request, run)
    payload = plat.runs.result(run.id)
    header = envelope.read_header(head_of(payload)) if payload else {}
    body = {"run_id": run.id, "status": run.status, "exit_reason": run.exit_reason}
    if run.status == "succeeded":
        body["result"] = header.get("json")
        body["result_is_json"] = "json" in header
        if "json" not in header:
            body["note"] = "the result is not JSON-serializable; read it with the Python SDK"
    else:
        body["error"] = {k: header.get(k) for k in ("type", "message", "traceback")}
    return ok(body)


async def get_logs(request: Request):
    """
    summary: A run's output (stdout and stderr), as plain text; follow=1 streams it until the run ends
    description: With attempt=N, the output of that attempt only (a retried run's attempts are 0, 1, ...).
    parameters:
      - {name: follow, in: query, schema: {type: boolean}}
      - {name: attempt, in: query, schema: {type: integer, minimum: 0}}
    responses:
      200: {description: text/plain stream}
    """
    ws = workspace(request)
    runs = platform(request).runs
    run_id = request.path_params["run"]
    run = runs.get(ws, run_id)
    expired(run, "log")
    follow = request.query_params.get("follow", "").lower() in ("1", "true", "yes")
    attempt = query_number(request, "attempt", None, 0, 1000, int)
    after, last = runs.attempt_logs(run, attempt) if attempt is not None else (-2, None)

    async def stream():
        nonlocal after
        while True:
            chunks = runs.logs_after(run_id, after)
            for seq, data in chunks:
                if last is not None and seq > last:
                    return
                after = seq
                yield bytes(data)
            if chunks:
                continue
            if not follow or last is not None or runs.get(ws, run_id).status in TERMINAL:
                return
            if runs.notifier.closing:
                yield SHUTTING_DOWN_LOG
                return
            await runs.notifier.wait(f"logs:{run_id}", 15.0)

    return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")


async def get_attempts(request: Request):
    """
    summary: A run's attempts, oldest first (the last is the run as it is now)
    description: >
      Each with its number, status, reason, error type and a link to its own output. A run with retries
      left goes back to queued after a failed attempt, with retry_at when its Retries policy waits.
    responses:
      200: {description: Attempts}
      404: {description: No such run}
    """
    ws = workspace(request)
    runs = platform(request).runs
    run = runs.get(ws, request.path_params["run"])
    base = base_url(request, ws)
    return ok({"run_id": run.id, "attempts": [attempt_json(a, base) for a in runs.attempts(run.id)]
               + [attempt_json(run, base)]})


def expired(run, what: str) -> None:
    """410 for what retention dropped: the run's record stays, with when its payloads and log went."""
    if run.expired_at is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(run.expired_at))
        raise Gone(f"the {what} of run {run.id} has expired: finished runs' arguments, results and logs are kept "
                   f"for their job's retention (OPBOX_RETENTION_DAYS, or @operator(retention_days=...)); "
                   f"dropped at {when}", expired_at=run.expired_at)


async def cancel_run(request: Request):
    """
    summary: Cancel a run (SIGTERM, then SIGKILL after the grace period)
    responses:
      200: {description: The run}
    """
    ws = workspace(request)
    run = await platform(request).runs.cancel(ws, request.path_params["run"])
    return ok(run_json(run, base_url(request, ws)))


def admin(request: Request, what: str = "manage tokens") -> str:
    ws = request.path_params["workspace"]
    row = platform(request).auth.check(request.headers.get("authorization"), ws)
    if row.role != "admin":
        raise Forbidden(f"only a workspace admin token may {what}")
    return ws


async def list_tokens(request: Request):
    """
    summary: The workspace's tokens (never their secret values)
    responses:
      200: {description: Tokens}
      403: {description: Not an admin token}
    """
    ws = admin(request)
    return ok({"tokens": [token_json(t) for t in platform(request).auth.tokens(ws)]})


async def create_token(request: Request):
    """
    summary: Make a token; its value is shown only in this answer
    requestBody:
      content:
        application/json:
          schema: {type: object, properties: {name: {type: string}, role: {type: string, enum: [admin, member]}}}
    responses:
      201: {description: The new token}
    """
    ws = admin(request)
    body = await json_body(request, required=False)
    name = check_name(body.get("name", "token"), "token name")
    role = body.get("role", "member")
    if role not in ("admin", "member"):
        raise ValidationError("role must be 'admin' or 'member'")
    token_id, token = platform(request).auth.create_token(ws, name=name, role=role)
    return ok({"id": token_id, "name": name, "role": role, "token": token}, 201)


async def revoke_token(request: Request):
    """
    summary: Revoke a token
    responses:
      200: {description: Revoked}
      404: {description: No such active token}
    """
    ws = admin(request)
    platform(request).auth.revoke(ws, request.path_params["token"])
    return ok({"revoked": request.path_params["token"]})


async def status(request: Request):
    """
    summary: The backend's pools and workers, for this workspace
    responses:
      200: {description: Status}
    """
    ws = workspace(request)
    plat = platform(request)
    info = plat.backend.describe(ws)
    info["runs"] = plat.runs.open_counts(ws)
    info["maps_in_memory"] = plat.runs.maps_in_memory(ws)
    info["storage"] = plat.runs.storage(ws)
    return ok(info)
