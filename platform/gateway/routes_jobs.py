"""Routes for jobs: uploads, deploys, versions, calls, triggers and maps."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import time

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from opbox import envelope, result_frames
from opbox.errors import BadRequest, BuildError, Forbidden, OpboxError, ValidationError

from ..control.auth import CALLER_ROLES
from ..records.base import TERMINAL, Payload, RunRecord, StoredPayload, TokenRecord
from .http import (count_error, error_response, json_body, number, ok, payload_response, query_number, query_values,
                   read_body, read_payload, receive_payload)
from .follow import follow, follow_ndjson
from .render import batch_json, job_json, run_json, version_json

_FRAME = struct.Struct(">I")
log = logging.getLogger("opbox.gateway")


def platform(request: Request):
    return request.app.state.platform


def workspace(request: Request) -> str:
    return caller(request).workspace


def caller(request: Request) -> TokenRecord:
    """The request's token, checked for the workspace in its path; a caller's token (a run's or a
    service's own) only for the routes a run may use (403 for the others)."""
    headers = request.headers
    row = platform(request).auth.check(headers.get("authorization"), request.path_params["workspace"],
                                       headers.get("x-opbox-caller-run"))
    if row.role in CALLER_ROLES and request.scope.get("endpoint") not in request.app.state.caller_routes:
        raise Forbidden(f"a {row.role}'s own token may call, map, trigger and read runs and call services of its "
                        "workspace, nothing else; use a user's token for this")
    return row


def parent_of(row: TokenRecord) -> tuple[str, float | None] | None:
    """(run id, deadline) of the run whose code sends this request, if one does."""
    return (row.run_id, row.deadline) if row.run_id is not None else None


def build_counter(metrics, ws: str):
    """A done-callback for a deploy's task: the build's time and outcome in the metrics."""
    start = time.perf_counter()

    def count(task: asyncio.Task) -> None:
        ok = not task.cancelled() and task.exception() is None
        metrics.builds(ws, "ready" if ok else "failed").observe(time.perf_counter() - start)
        if not ok:
            metrics.build_failures(ws).inc()
    return count


def base_url(request: Request, ws: str) -> str:
    return f"{platform(request).settings.url}/{ws}"


async def list_jobs(request: Request):
    """
    summary: List the workspace's jobs
    responses:
      200: {description: Jobs, newest first}
    """
    ws = workspace(request)
    return ok({"jobs": [job_json(j) for j in platform(request).deploys.jobs(ws)]})


async def create_upload(request: Request):
    """
    summary: Ask where to upload a code archive
    description: Answers a signed, expiring upload URL, or exists=true when an archive with that sha256 is stored already.
      With the deploy's resource and image, checks first that the backend and builder can honour them (a GPU on
      the local backend without one, apt packages there), so a deploy that would be refused sends no code.
    requestBody:
      required: true
      content:
        application/json:
          schema:
            type: object
            required: [sha256, size]
            properties: {sha256: {type: string}, size: {type: integer}, resource: {type: object}, image: {type: object}}
    responses:
      200: {description: Upload slot}
      413: {description: Archive too large}
      422: {description: The resource or image cannot be honoured here (the message says what to do)}
      507: {description: The workspace's storage quota is reached (storage_quota_exceeded)}
    """
    ws = workspace(request)
    body = await json_body(request)
    deploys = platform(request).deploys
    deploys.check_wanted(body.get("resource"), body.get("image"))
    return ok(await deploys.upload_slot(ws, body.get("sha256"), body.get("size")))


async def deploy(request: Request):
    """
    summary: Deploy a new version of a job
    description: Streams the build's output as NDJSON lines {"log"}, ending with {"done", "job", "version"} or {"error"}.
    requestBody:
      required: true
      content:
        application/json:
          schema:
            type: object
            required: [name, entry, code_sha256, python]
            properties:
              name: {type: string}
              kind: {type: string, enum: [function, class, asgi]}
              entry: {type: string}
              code_sha256: {type: string}
              python: {type: string}
              cloudpickle: {type: string}
              resource: {type: object}
              image: {type: object, description: 'Image customization: base, apt, pip, run (see opbox.Image)'}
    responses:
      200: {description: NDJSON build stream}
      404: {description: No uploaded code with that sha256}
      422: {description: Invalid deploy request}
    """
    ws = workspace(request)
    plat = platform(request)
    spec = plat.deploys.parse_spec(ws, await json_body(request))
    code = await plat.deploys.load_code(ws, spec["code_sha256"])
    lines: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(plat.deploys.deploy(ws, spec, code, lines.put_nowait))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # the build goes on if the client leaves
    task.add_done_callback(build_counter(plat.metrics, ws))

    async def stream():
        while True:
            getter = asyncio.ensure_future(lines.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield json.dumps({"log": getter.result()}) + "\n"
                continue
            getter.cancel()
            while not lines.empty():
                yield json.dumps({"log": lines.get_nowait()}) + "\n"
            exc = task.exception()
            if exc is None:
                job, version = task.result()
                yield json.dumps({"done": True, "job": job_json(job), "version": version}) + "\n"
            else:
                error = exc if isinstance(exc, OpboxError) else OpboxError(f"{type(exc).__name__}: {exc}")
                body = error.to_dict()
                if isinstance(error, BuildError) and error.log:
                    body.setdefault("details", {})["log"] = error.log
                yield json.dumps({"error": body}) + "\n"
            return

    return StreamingResponse(stream(), media_type="application/x-ndjson")


async def get_job(request: Request):
    """
    summary: A job, by id or name
    responses:
      200: {description: The job}
      404: {description: No such job}
    """
    ws = workspace(request)
    job, _ = _job(request, ws)
    return ok(job_json(job))


async def delete_job(request: Request):
    """
    summary: Delete a job with its versions, runs (arguments, results, logs, items) and maps
    description: >
      Refused with 409 while the job has runs queued or running (cancel them or let them end), a map in
      flight, a version building, or a service serving it (delete the service first): nothing in flight breaks.
    responses:
      200: {description: '{"deleted": job id, "name", "runs": runs deleted, "bytes": bytes freed}'}
      404: {description: No such job}
      409: {description: Runs are open, a map is in flight, a build is going on, or a service serves the job}
    """
    ws = workspace(request)
    return ok(await platform(request).deploys.delete_job(ws, request.path_params["job"]))


def _job(request: Request, ws: str):
    plat = platform(request)
    return plat.deploys.job(ws, request.path_params["job"]), plat


async def list_versions(request: Request):
    """
    summary: The versions of a job
    responses:
      200: {description: Versions, newest first}
    """
    ws = workspace(request)
    job, plat = _job(request, ws)
    return ok({"versions": [version_json(v) for v in plat.deploys.versions(job)]})


async def build_log(request: Request):
    """
    summary: The build output of a job version
    responses:
      200: {description: Plain text}
    """
    ws = workspace(request)
    job, plat = _job(request, ws)
    version = query_number(request, "version", job.latest_version, 1, 10**9, int)
    return Response(plat.deploys.build_log(job, version), media_type="text/plain")


async def list_runs(request: Request):
    """
    summary: The runs of a job, newest first
    parameters:
      - {name: status, in: query, schema: {type: string}}
      - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 1000}}
      - {name: before, in: query, description: a run id; lists older runs, schema: {type: string}}
    responses:
      200: {description: Runs}
    """
    ws = workspace(request)
    job, plat = _job(request, ws)
    limit = query_number(request, "limit", 50, 1, 1000, int)
    rows = plat.runs.of_job(job.id, request.query_params.get("status"), request.query_params.get("before"), limit)
    base = base_url(request, ws)
    return ok({"runs": [run_json(r, base) for r in rows]})


def _version_param(request: Request) -> int | None:
    return query_number(request, "version", None, 1, 10**9, int)


async def envelope_response(request: Request, run: RunRecord, result: Payload | None = None) -> Response:
    """A finished run's result envelope (read from the records unless given), with its status in headers
    (the SDK's answer)."""
    headers = {"X-Opbox-Run-Id": run.id, "X-Opbox-Status": run.status, "X-Opbox-Version": str(run.version)}
    if run.exit_reason:
        headers["X-Opbox-Exit-Reason"] = json.dumps(run.exit_reason[:1000])
    plat = platform(request)
    payload = result if result is not None else plat.runs.result(run.id)
    by_url = isinstance(payload, StoredPayload) and envelope.ACCEPT_URL_HEADER in request.headers
    return await payload_response(plat.payloads, payload, headers, by_url)


async def call(request: Request):
    """
    summary: Run a job with pickled arguments and wait for the result (the SDK's call path)
    parameters:
      - {name: wait, in: query, description: seconds to wait for the result, schema: {type: number, minimum: 0, maximum: 300}}
      - {name: version, in: query, schema: {type: integer, minimum: 1}}
      - {name: traceparent, in: header, description: 'W3C trace context of the caller: the run joins its trace (invalid or absent: a new trace)', schema: {type: string}}
    requestBody:
      required: true
      content:
        application/x-opbox-envelope: {schema: {type: string, format: binary}}
        application/octet-stream: {schema: {type: string, format: binary}}
    responses:
      200: {description: The result envelope (the run ended)}
      202: {description: The run, still going}
      422: {description: 'A wait or version that is not a number in its range'}
      507: {description: No room for the arguments (storage_full, storage_quota_exceeded)}
    """
    return CallResponse(request.path_params["workspace"], request.path_params["job"])


class CallResponse(Response):
    """The routed ``call``'s answer: ``call_asgi`` run as a response, so the router's way in answers as the
    fast path (``GatewayApp``) does."""

    def __init__(self, ws: str, job: str):
        self.ws, self.job = ws, job
        self.status_code, self.background = 200, None

    async def __call__(self, scope, receive, send) -> None:
        await call_asgi(scope["app"].state.platform, scope, receive, send, self.ws, self.job)


def call_target(path: str) -> tuple[str, str] | None:
    """``(workspace, job)`` when ``path`` is ``/{ws}/job/{job}/runs`` (a POST there is a call), by one split;
    "_..." workspaces are the dashboard's and the store's paths."""
    parts = path.split("/")  # "", ws, "job", job, "runs"
    if len(parts) == 5 and parts[2] == "job" and parts[4] == "runs" and parts[1] and parts[3] and parts[1][0] != "_":
        return parts[1], parts[3]
    return None


async def call_asgi(plat, scope, receive, send, ws: str, job: str) -> None:
    """One call (``POST /{ws}/job/{job}/runs``) as a pure ASGI handler: no request, query, header or response
    objects on the way of a small result; the routed ``call`` and the fast path both end here. Errors are
    answered here as the app's handlers answer them (OpboxError as its JSON, anything else 500, logged)."""
    try:
        authorization = traceparent = length = caller_run = None  # the first of each, as starlette's Headers.get gives it
        by_url = False
        for key, value in scope["headers"]:
            if key == b"authorization":
                if authorization is None:
                    authorization = value.decode("latin-1")
            elif key == b"content-length":
                if length is None:
                    length = value.decode("latin-1")
            elif key == b"traceparent":
                if traceparent is None:
                    traceparent = value.decode("latin-1")
            elif key == b"x-opbox-accept-url":
                by_url = True
            elif key == b"x-opbox-caller-run":
                if caller_run is None:
                    caller_run = value.decode("latin-1")
        # a caller's (run's or service's) own token may call: jobs.call is one of its routes (CALLER_ROUTES)
        token = plat.auth.check(authorization, ws, caller_run)
        query = query_values(scope["query_string"])
        version_no = number(query.get("version"), "version", None, 1, 10**9, int)
        wait = number(query.get("wait"), "wait", 0.0, 0, 300)
        _, version = plat.deploys.resolve(ws, job, version_no)
        payload = await receive_payload(length, receive, plat.payloads, ws, plat.settings.max_payload, "arguments")
        run_id = plat.runs.create(version, payload, trigger="call", traceparent=traceparent, parent=parent_of(token))
        run, result = await plat.runs.call(ws, run_id, wait)
        if run.status not in TERMINAL:
            response = JSONResponse(run_json(run, f"{plat.settings.url}/{ws}"), status_code=202)
        else:
            payload = result if result is not None else plat.runs.result(run.id)
            response = await _result_answer(run, payload, plat.payloads, by_url)
    except ClientDisconnect:
        return  # the caller left: nobody to answer (its run goes on)
    except OpboxError as exc:
        count_error(plat.metrics, exc)
        response = error_response(exc)
    except Exception as exc:  # what the app's handler for the unexpected does, for the way in that skips it
        log.exception("unhandled error on %s %s", scope["method"], scope["path"])
        response = JSONResponse({"error": "internal_error", "message": f"internal error: {type(exc).__name__}"}, 500)
    if type(response) is tuple:  # an inline result: its headers and body
        await send({"type": "http.response.start", "status": 200, "headers": response[0]})
        await send({"type": "http.response.body", "body": response[1]})
        return
    await response(scope, receive, send)


_ENVELOPE_TYPE = envelope.CONTENT_TYPE.encode()


async def _result_answer(run: RunRecord, payload: Payload | None, payloads, by_url: bool) -> tuple | Response:
    """A finished run's result envelope with its status in headers, as ``envelope_response`` answers it:
    for an inline result, (its raw headers, its body), sent with no response object."""
    headers = [(b"x-opbox-run-id", run.id.encode()), (b"x-opbox-status", run.status.encode()),
               (b"x-opbox-version", b"%d" % run.version)]
    if run.exit_reason:
        headers.append((b"x-opbox-exit-reason", json.dumps(run.exit_reason[:1000]).encode()))
    if isinstance(payload, StoredPayload):
        return await payload_response(payloads, payload, {k.decode(): v.decode() for k, v in headers}, by_url)
    body = payload or b""
    headers += ((b"content-length", b"%d" % len(body)), (b"content-type", _ENVELOPE_TYPE))
    return headers, body

async def trigger(request: Request):
    """
    summary: Start a run of the job's latest version
    description: >
      The body is optional: JSON {"args": [...], "kwargs": {...}, "version": N}, or a pickled args envelope.
      Without arguments the function runs with its defaults.
    parameters:
      - {name: traceparent, in: header, description: 'W3C trace context of the caller: the run joins its trace (invalid or absent: a new trace)', schema: {type: string}}
    requestBody:
      content:
        application/json:
          schema: {type: object, properties: {args: {type: array}, kwargs: {type: object}, version: {type: integer}}}
    responses:
      202: {description: The run's id and where to read its status, result and logs}
      422: {description: 'JSON arguments that do not fit the function: missing or unknown ones (validation_error, naming the signature)'}
      507: {description: No room for the arguments (storage_full, storage_quota_exceeded)}
    """
    token = caller(request)
    ws = token.workspace
    plat = platform(request)
    ctype = request.headers.get("content-type", "")
    version_no = _version_param(request)
    if ctype.startswith(envelope.CONTENT_TYPE):
        payload = await read_payload(request, plat.payloads, ws, plat.settings.max_payload, "arguments")
    else:
        body = await json_body(request, plat.settings.max_payload, required=False)
        unknown = set(body) - {"args", "kwargs", "version"}
        if unknown:
            raise ValidationError(f"unknown field(s) {sorted(unknown)}; expected args, kwargs, version")
        if body.get("version") is not None:
            if isinstance(body["version"], bool) or not isinstance(body["version"], int) or body["version"] < 1:
                raise ValidationError("version must be a whole number >= 1")
            version_no = body["version"]
        payload = envelope.json_args(body.get("args"), body.get("kwargs"))
    _, version = plat.deploys.resolve(ws, request.path_params["job"], version_no)
    if not ctype.startswith(envelope.CONTENT_TYPE):
        plat.deploys.check_json_call(version, body.get("args"), body.get("kwargs"))
    run_id = plat.runs.create(version, payload, trigger="trigger", traceparent=request.headers.get("traceparent"),
                              parent=parent_of(token))
    run = plat.runs.get(ws, run_id)
    return JSONResponse({"run_id": run_id, **run_json(run, base_url(request, ws))}, status_code=202)


# -- map ------------------------------------------------------------------------------
async def create_batch(request: Request):
    """
    summary: Start a map (a batch of runs); items are added with POST /batches/{id}/items
    requestBody:
      content:
        application/json:
          schema: {type: object, properties: {concurrency: {type: integer, minimum: 1}, version: {type: integer}}}
    responses:
      201: {description: The batch}
    """
    token = caller(request)
    ws = token.workspace
    plat = platform(request)
    body = await json_body(request, required=False)
    version_no = body.get("version")
    if version_no is not None and (isinstance(version_no, bool) or not isinstance(version_no, int)):
        raise ValidationError("version must be a whole number")
    _, version = plat.deploys.resolve(ws, request.path_params["job"], version_no)
    batch_id = plat.runs.create_batch(version, body.get("concurrency"), parent=parent_of(token))
    return ok({"batch_id": batch_id, "job_id": version.job_id, "version": version.version}, 201)


def split_frames(data: bytes) -> list[bytes]:
    """Length-prefixed frames: 4-byte big-endian length, then that many bytes; repeated."""
    frames, pos = [], 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise BadRequest("truncated frame header in request body")
        (size,) = _FRAME.unpack_from(data, pos)
        pos += 4
        if pos + size > len(data):
            raise BadRequest("truncated frame in request body")
        frames.append(data[pos:pos + size])
        pos += size
    return frames


async def add_items(request: Request):
    """
    summary: Add items to a map, as length-prefixed args envelopes; idempotent per index
    description: >
      Answers how many items were new and how many from the front are stored ("accepted"). Under the
      workspace's open-runs quota only a prefix may be accepted: send the rest again from start+accepted.
      429 when none fits, or fewer than a good part of them (Retry-After); with ``count`` (how many items the
      body holds) that 429 comes before the body is read.
    parameters:
      - {name: start, in: query, required: true, schema: {type: integer, minimum: 0}}
      - {name: count, in: query, required: false, schema: {type: integer, minimum: 1}, description: 'How many items the body holds: a 429 for want of room is then answered before the body is read'}
      - {name: traceparent, in: header, description: 'W3C trace context of the caller: the run joins its trace (invalid or absent: a new trace)', schema: {type: string}}
    requestBody:
      required: true
      content:
        application/octet-stream: {schema: {type: string, format: binary}}
    responses:
      200: {description: How many items were new}
      429: {description: 'The open-runs quota has no room for them yet (quota_exceeded): send them again after Retry-After'}
      507: {description: No room for the items (storage_full, storage_quota_exceeded)}
    """
    ws = workspace(request)
    plat = platform(request)
    start = query_number(request, "start", None, 0, 10**12, int)
    if start is None:
        raise ValidationError("query parameter 'start' is required")
    batch = request.path_params["batch"]
    count = query_number(request, "count", None, 1, 10**9, int)
    if count is not None:  # past the open-runs quota: the 429 before the body is read and parsed
        plat.runs.check_room(ws, count, batch)
    frames = split_frames(await read_body(request, plat.settings.max_request_body))
    # large items go to the object store (or are there already: a reference to a signed upload, claimed once,
    # so a resent request's references to items stored already are left as they are)
    refs = any(frame.startswith(envelope.REF_MAGIC) for frame in frames)
    stored = plat.runs.stored_items(ws, batch, start, len(frames)) if refs else ()
    if refs or max(map(len, frames), default=0) > plat.payloads.inline:  # else each is kept as it is
        frames = [frame if start + i in stored else await plat.payloads.keep(ws, frame, plat.settings.max_payload)
                  for i, frame in enumerate(frames)]
    added, accepted = plat.runs.add_items(ws, batch, start, frames, request.headers.get("traceparent"))
    return ok({"added": added, "accepted": accepted, "received": len(frames)})


async def seal_batch(request: Request):
    """
    summary: Declare a map's total number of items
    requestBody:
      required: true
      content:
        application/json: {schema: {type: object, required: [total], properties: {total: {type: integer}}}}
    responses:
      200: {description: The batch}
    """
    ws = workspace(request)
    body = await json_body(request)
    return ok(batch_json(platform(request).runs.seal_batch(ws, request.path_params["batch"], body.get("total"))))


async def get_batch(request: Request):
    """
    summary: A map's progress
    responses:
      200: {description: The batch}
    """
    ws = workspace(request)
    return ok(batch_json(platform(request).runs.batch(ws, request.path_params["batch"])))


async def cancel_batch(request: Request):
    """
    summary: Cancel a map's remaining runs
    responses:
      200: {description: The batch}
    """
    ws = workspace(request)
    return ok(batch_json(await platform(request).runs.cancel_batch(ws, request.path_params["batch"])))


async def batch_results(request: Request):
    """
    summary: Stream a map's results as they complete (NDJSON, or frames with Accept application/x-opbox-frames)
    description: >
      One line per finished item, {"index", "run_id", "status", "seq", "exit_reason", "payload" (base64 envelope)},
      in completion order, from completion number after+1 on; ends when all items are done. A result kept in
      the object store (above OPBOX_PAYLOAD_INLINE) comes as {"stored": true, "size"} instead of "payload":
      read it from GET /runs/{run_id}/result; one past its retention as {"expired": true}. While none comes a
      {"heartbeat": true} line is sent every 15 s; a gateway that stops ends the stream with {"shutdown": true,
      "message"}: reconnect with after= the last seq seen.

      With `Accept: application/x-opbox-frames` (the SDK's form) the same stream comes as length-prefixed
      frames instead: per frame 9 bytes (kind: 0 result, 1 stored, 2 expired, 3 heartbeat, 4 shutdown; the
      meta's length and the body's, 4 bytes each, big-endian), then the meta (UTF-8, tab-separated:
      index, seq, status, run_id, a stored result's size or empty, exit_reason or empty; a shutdown's message),
      then the body (a result's envelope bytes, not base64).
    parameters:
      - {name: after, in: query, schema: {type: integer, minimum: 0}}
      - {name: accept, in: header, schema: {type: string}, description: 'application/x-opbox-frames for frames'}
    responses:
      200: {description: NDJSON stream (application/x-ndjson), or frames (application/x-opbox-frames)}
    """
    ws = workspace(request)
    runs = platform(request).runs
    batch_id = request.path_params["batch"]
    runs.batch(ws, batch_id)
    after = query_number(request, "after", 0, 0, 10**12, int)
    read = lambda a: runs.batch_results(batch_id, a)  # noqa: E731
    wait = lambda: runs.notifier.wait(f"batch:{batch_id}", 15.0)  # noqa: E731
    closing = lambda: runs.notifier.closing  # noqa: E731
    if result_frames.MEDIA_TYPE in request.headers.get("accept", ""):
        return follow(after, read, _result_frames, lambda a: b"" if runs.batch_over(batch_id, a) else None, wait,
                      closing, result_frames.MEDIA_TYPE, result_frames.frame(result_frames.HEARTBEAT),
                      result_frames.frame(result_frames.SHUTDOWN, "the platform is shutting down: reconnect"))

    def render(r) -> tuple[int, dict]:
        line = {"index": r.index, "run_id": r.run_id, "status": r.status, "seq": r.seq, "exit_reason": r.exit_reason}
        if r.payload is None:
            line["expired"] = True  # kept past its retention: the record stays, the result is gone
        elif isinstance(r.payload, StoredPayload):  # large: read it from the run's result route
            line["stored"], line["size"] = True, r.payload.size
        else:
            line["payload"] = base64.b64encode(r.payload).decode()
        return r.seq, line

    return follow_ndjson(after, read, render, lambda a: "" if runs.batch_over(batch_id, a) else None, wait, closing)


def _result_frames(rows: list) -> tuple[int, bytes]:
    """A map's results as frames (``opbox.result_frames``): the envelopes' bytes as stored."""
    out = []
    for r in rows:
        payload = r.payload
        if payload is None:  # kept past its retention: the record stays, the result is gone
            out.append(result_frames.result_frame(result_frames.EXPIRED, r.index, r.seq, r.status, r.run_id,
                                                  r.exit_reason))
        elif isinstance(payload, StoredPayload):  # large: read it from the run's result route
            out.append(result_frames.result_frame(result_frames.STORED, r.index, r.seq, r.status, r.run_id,
                                                  r.exit_reason, payload.size))
        else:
            out.append(result_frames.result_frame(result_frames.RESULT, r.index, r.seq, r.status, r.run_id,
                                                  r.exit_reason, body=payload))
    return rows[-1].seq, b"".join(out)
