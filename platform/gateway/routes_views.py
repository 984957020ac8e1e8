"""Routes reading across jobs: the workspace's runs (filtered, paged) and its maps with their progress."""

from __future__ import annotations

from urllib.parse import urlencode

from starlette.requests import Request

from .http import ok, query_number
from .render import batch_json, page_json, progress_json, run_json
from .routes_jobs import base_url, platform, workspace

FILTERS = ("job", "status", "trigger", "batch", "parent")


def run_query(request: Request) -> dict:
    """The runs filters of a request's query (the API's and the dashboard's): names as in ``Views.runs``."""
    params = request.query_params
    query = {name: params.get(name) or None for name in FILTERS}
    query["since"] = query_number(request, "since", None, 0, 1e11)
    query["until"] = query_number(request, "until", None, 0, 1e11)
    query["cursor"] = params.get("cursor") or None
    query["limit"] = query_number(request, "limit", 50, 1, 1000, int)
    return query


def next_url(request: Request) -> str:
    """This request's URL without its cursor, ready for ``cursor=...``."""
    kept = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"]
    return f"{request.url.path}?{urlencode(kept)}{'&' if kept else ''}"


async def list_runs(request: Request):
    """
    summary: The workspace's runs across its jobs, newest first, filtered and paged
    description: >
      Filters combine (AND). Paging is by cursor: pass the answer's "next" as cursor= for the
      next (older) page; "next" is null on the last page. Each page is one index walk, as fast at
      a million stored runs as at ten.
    parameters:
      - {name: job, in: query, description: a job id or name, schema: {type: string}}
      - {name: status, in: query, schema: {type: string, enum: [queued, running, succeeded, failed, cancelled, timed_out]}}
      - {name: trigger, in: query, description: "how runs were made: call, trigger, map, ...", schema: {type: string}}
      - {name: batch, in: query, description: a map's batch id, schema: {type: string}}
      - {name: parent, in: query, description: "a run id: the runs its code started (jobs calling jobs)", schema: {type: string}}
      - {name: since, in: query, description: created at or after (epoch seconds), schema: {type: number}}
      - {name: until, in: query, description: created before (epoch seconds), schema: {type: number}}
      - {name: cursor, in: query, description: the previous page's next, schema: {type: string}}
      - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 1000, default: 50}}
    responses:
      200: {description: '{"runs": [...], "next": cursor or null, "next_url"}'}
      422: {description: An invalid filter}
    """
    ws = workspace(request)
    page = platform(request).views.runs(ws, **run_query(request))
    base = base_url(request, ws)
    return ok(page_json(page, "runs", lambda run: run_json(run, base), next_url(request)))


async def list_batches(request: Request):
    """
    summary: The workspace's maps, newest first
    description: >
      Each map with its counters (submitted, done, total); paged by cursor like the runs. A map's items
      by status are at /{workspace}/batches/{batch}/progress.
    parameters:
      - {name: cursor, in: query, description: the previous page's next, schema: {type: string}}
      - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 1000, default: 50}}
    responses:
      200: {description: '{"batches": [...], "next": cursor or null, "next_url"}'}
    """
    ws = workspace(request)
    limit = query_number(request, "limit", 50, 1, 1000, int)
    page = platform(request).views.batches(ws, request.query_params.get("cursor") or None, limit)
    return ok(page_json(page, "batches", batch_json, next_url(request)))


async def batch_progress(request: Request):
    """
    summary: A map's progress, its items counted by status
    responses:
      200: {description: 'The map with "counts" ({"queued": n, "running": n, "succeeded": n, ...}) and "finished"'}
      404: {description: No such map}
    """
    ws = workspace(request)
    return ok(progress_json(platform(request).views.batch(ws, request.path_params["batch"])))
