"""Routes the runtime calls: warm workers pulling runs, and one-shot batch runs.

Authenticated with tokens derived from the platform's secret and scoped to one pool or one
run. Payloads pass through as bytes; nothing here decodes them.
"""

from __future__ import annotations

import struct

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from opbox import envelope
from opbox.errors import AuthError, BadRequest, Conflict, NotFound, OpboxError

from ..backends.base import EXIT, SKIPPED, Completion, GroupLease, Lease, WorkerPools, require
from ..payload import StoredPayload
from .http import json_body, ok, payload_response, query_number, read_body, read_payload
from .routes_jobs import platform

LOG_CHUNK_LIMIT = 2 * 1024 * 1024  # the runtime ships at most 1 MiB a request; the run's budget is applied after
# a group's frames (runtime/worker.py has the same): to the worker, per run its (meta, arguments) with meta
# "run id, timeout, traceparent, arguments URL" (tab-separated); from it, per run (outcome, run id, result)
LEASE_HEAD = struct.Struct(">HI")
RESULT_HEAD = struct.Struct(">BHI")
OUTCOMES = ("failed", "succeeded", SKIPPED)


def _worker(request: Request):
    """The calling worker, authenticated by its own token (None: unknown to the platform now, so it exits)."""
    plat = platform(request)
    pools = require(plat.backend, WorkerPools)
    token = (request.headers.get("authorization") or "").partition(" ")[2].strip()
    if not token:
        raise AuthError("missing worker token")
    worker = pools.find_worker(request.path_params["pool"], request.headers.get("x-opbox-worker", ""), token)
    return plat, pools, worker


def next_target(path: str) -> str | None:
    """The pool when ``path`` is ``/_internal/pools/{pool}/next`` (a POST there is a worker's next), by one split."""
    parts = path.split("/")  # "", "_internal", "pools", pool, "next"
    if len(parts) == 5 and parts[4] == "next" and parts[1] == "_internal" and parts[2] == "pools" and parts[3]:
        return parts[3]
    return None


async def worker_next(request: Request):
    plat, pools, worker = _worker(request)
    if worker is None:
        return Response(status_code=204, headers={"X-Opbox-Action": "exit"})
    done = None
    run_id = request.headers.get("x-opbox-done")
    if "x-opbox-group" in request.headers:  # the results of the group it holds, streamed as each run ends
        try:
            await _group_results(request, plat, pools, worker)
        except ClientDisconnect:  # the worker is gone (killed): its runs are the pool's to settle, no next run
            return Response(status_code=204, headers={"X-Opbox-Action": EXIT})
    elif run_id:
        outcome, payload = await _result(request, plat, worker.pool.version.workspace)
        done = Completion(run_id, outcome, payload)
    wait = query_number(request, "wait", 10.0, 0, 60)
    answer = await pools.next_run(worker, done, wait)
    if isinstance(answer, Lease):
        headers = {"X-Opbox-Run": answer.run_id, "X-Opbox-Result-Limit": str(plat.settings.max_payload),
                   "X-Opbox-Inline": str(plat.payloads.inline)}
        if answer.timeout:
            headers["X-Opbox-Timeout"] = str(answer.timeout)
        if answer.traceparent:
            headers["X-Opbox-Traceparent"] = answer.traceparent
        return await payload_response(plat.payloads, answer.args, headers, by_url=True, internal=True)
    if isinstance(answer, GroupLease):
        return _group_lease(plat, answer)
    return Response(status_code=204, headers={"X-Opbox-Action": answer})


def _group_lease(plat, group: GroupLease) -> Response:
    """Several runs in one answer: per run a frame of its meta and its arguments (by URL when stored)."""
    parts = []
    for lease in group.leases:
        args, url = lease.args, ""
        if isinstance(args, StoredPayload):
            args, url = b"", plat.payloads.download_url(args, True)
        meta = f"{lease.run_id}\t{lease.timeout or ''}\t{lease.traceparent or ''}\t{url}".encode()
        parts += (LEASE_HEAD.pack(len(meta), len(args)), meta, args)
    return Response(b"".join(parts), media_type="application/x-opbox-group",
                    headers={"X-Opbox-Group": str(len(group.leases)), "X-Opbox-Inline": str(plat.payloads.inline),
                             "X-Opbox-Result-Limit": str(plat.settings.max_payload)})


async def _group_results(request: Request, plat, pools, worker) -> None:
    """Hand in a group's results as their frames arrive: what one read brings is recorded together (one
    transaction), and the group's next run is in hand from then (its timeout, a cancel)."""
    workspace = worker.pool.version.workspace
    limit = plat.settings.max_payload + 1024**2
    frame_limit = plat.payloads.inline + 65536  # larger results come as references to their uploads
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        dones, pos, head = [], 0, RESULT_HEAD.size
        while len(buf) - pos >= head:
            code, id_len, size = RESULT_HEAD.unpack_from(buf, pos)
            if code >= len(OUTCOMES) or size > frame_limit:
                raise BadRequest(f"bad result frame from worker {worker.id} (outcome {code}, {size} bytes)")
            end = pos + head + id_len + size
            if len(buf) < end:
                break
            run_id = buf[pos + head:pos + head + id_len].decode()
            outcome, body = OUTCOMES[code], bytes(buf[pos + head + id_len:end])
            pos = end
            if body.startswith(envelope.REF_MAGIC):  # uploaded to the object store with a signed URL: claim it
                try:
                    body = await plat.payloads.attach(workspace, body, limit, "result")
                except OpboxError as exc:
                    outcome, body = _unstored(outcome, exc)
            dones.append(Completion(run_id, outcome, body))
        del buf[:pos]
        if dones:
            pools.group_done(worker, dones)
    if buf:
        raise BadRequest(f"worker {worker.id} ended its results in the middle of a frame")


async def worker_cancelled(request: Request):
    """The runs of the worker's group cancelled since it took them (one a line): it skips those not started."""
    _, pools, worker = _worker(request)
    return Response("\n".join(pools.cancelled_in_group(worker)) if worker is not None else "", media_type="text/plain")


async def _result(request: Request, plat, workspace: str):
    """A run's outcome and result envelope from the body a runtime hands in. A result that cannot be kept
    (the disk is full) ends the run failed, saying why, rather than leaving it running."""
    outcome = request.headers.get("x-opbox-outcome", "failed")
    try:
        return outcome, await read_payload(request, plat.payloads, workspace, plat.settings.max_payload + 1024**2,
                                           "result")
    except OpboxError as exc:  # no room, or an uploaded result that cannot be used (too large, not there)
        return _unstored(outcome, exc)


def _unstored(outcome: str, exc: OpboxError) -> tuple[str, bytes]:
    return "failed", envelope.error_envelope(f"opbox.{type(exc).__name__}",
                                             f"the run ended ({outcome}) but its result could not be stored: "
                                             f"{exc.message}")


async def worker_logs(request: Request):
    plat, _, worker = _worker(request)
    run_id = request.path_params["run"]
    if worker is None or not _holds(worker, run_id):  # a worker writes the log of the run in its hands only
        raise NotFound(f"run {run_id} is not this worker's")
    plat.runs.append_log(run_id, await read_body(request, LOG_CHUNK_LIMIT))
    return Response(status_code=204)


async def worker_items(request: Request):
    plat, _, worker = _worker(request)
    run_id = request.path_params["run"]
    if worker is None or not _holds(worker, run_id):  # a worker streams the items of the run in its hands only
        raise NotFound(f"run {run_id} is not this worker's")
    await _item(request, plat, run_id, worker.pool.version.workspace)
    return Response(status_code=204)


def _holds(worker, run_id: str) -> bool:
    """Whether the run is the worker's: in hand, or in its group (whose next run it may have begun before its
    last result is read here)."""
    return worker.run_id == run_id or any(t.run_id == run_id for t in worker.group)


async def _item(request: Request, plat, run_id: str, workspace: str) -> None:
    """Keep the item (``?seq=N``, from 1) a streaming run's generator has just yielded."""
    seq = query_number(request, "seq", None, 1, 10**12, int)
    if seq is None:
        raise BadRequest("query parameter 'seq' is required")
    plat.items.add(run_id, seq, await read_payload(request, plat.payloads, workspace, plat.settings.max_payload, "item"))


# -- one-shot batch runs (python -m opbox.runtime run --run-id X) -----------------------
def _run(request: Request):
    plat = platform(request)
    run_id = request.path_params["run"]
    plat.auth.check_internal(request.headers.get("authorization"), f"run:{run_id}")
    return plat, run_id


def _run_record(request: Request):
    """The authenticated one-shot run's platform and record (404 when it is gone)."""
    plat, run_id = _run(request)
    run = plat.runs.find(run_id)
    if run is None:
        raise NotFound(f"no run {run_id}")
    return plat, run


async def run_args(request: Request):
    plat, run_id = _run(request)
    if not plat.runs.run_started(run_id, request.headers.get("x-opbox-worker", "batch")):
        raise Conflict(f"run {run_id} is not queued (cancelled or already started)")
    args = plat.runs.run_args(run_id)
    if args is None:
        raise NotFound(f"run {run_id} has no arguments")
    run = plat.runs.find(run_id)
    headers = {"X-Opbox-Result-Limit": str(plat.settings.max_payload), "X-Opbox-Inline": str(plat.payloads.inline)}
    if run is not None and run.timeout:
        headers["X-Opbox-Timeout"] = str(run.timeout)
    if run is not None and run.traceparent:
        headers["X-Opbox-Traceparent"] = run.traceparent
    return await payload_response(plat.payloads, args, headers, by_url=True, internal=True)


async def run_logs(request: Request):
    plat, run_id = _run(request)
    plat.runs.append_log(run_id, await read_body(request, LOG_CHUNK_LIMIT))
    return Response(status_code=204)


async def run_result(request: Request):
    plat, run = _run_record(request)
    outcome, payload = await _result(request, plat, run.workspace)
    plat.runs.run_finished(run.id, outcome, payload)
    return Response(status_code=204)


async def run_items(request: Request):
    plat, run = _run_record(request)
    await _item(request, plat, run.id, run.workspace)
    return Response(status_code=204)


# -- large results: the runtime puts them in the object store with a signed URL -------------
def _result_upload(request: Request, plat, workspace: str, size) -> dict:
    """A signed upload for a result (or a streamed item), whose reference the runtime then hands in."""
    return plat.payloads.upload_slot(workspace, size, plat.settings.max_payload, "result", internal=True)


async def worker_payload_upload(request: Request):
    plat, _, worker = _worker(request)
    if worker is None:
        raise NotFound("this worker is not known to the platform any more")
    size = (await json_body(request)).get("size")
    return ok(_result_upload(request, plat, worker.pool.version.workspace, size))


async def run_payload_upload(request: Request):
    plat, run = _run_record(request)
    size = (await json_body(request)).get("size")
    return ok(_result_upload(request, plat, run.workspace, size))


# -- opbox.File contents, for a run's arguments (fetch) and results (upload) --------------------
async def _file_route(request: Request, workspace: str, plat):
    if request.method == "GET":
        return ok(await plat.files.download(workspace, request.path_params["sha256"], internal=True))
    body = await json_body(request)
    return ok(await plat.files.upload_slot(workspace, body.get("sha256"), body.get("size"), internal=True))


async def worker_files(request: Request):
    plat, _, worker = _worker(request)
    if worker is None:
        raise NotFound("this worker is not known to the platform any more")
    return await _file_route(request, worker.pool.version.workspace, plat)


async def run_files(request: Request):
    plat, run = _run_record(request)
    return await _file_route(request, run.workspace, plat)
