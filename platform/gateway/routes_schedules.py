"""Routes for schedules: a job's cron expression or period, paused or not, and its next fire time."""

from __future__ import annotations

from starlette.requests import Request

from opbox.errors import ValidationError

from .http import json_body, ok
from .render import schedule_json
from .routes_jobs import platform, workspace



def _job_schedule(request: Request):
    ws = workspace(request)
    plat = platform(request)
    return ws, plat, plat.deploys.job(ws, request.path_params["job"])


async def list_schedules(request: Request):
    """
    summary: The workspace's schedules, with their next fire times
    responses:
      200: {description: Schedules}
    """
    ws = workspace(request)
    plat = platform(request)
    names = {j.id: j.name for j in plat.deploys.jobs(ws)}
    return ok({"schedules": [schedule_json(s, names.get(s.job_id)) for s in plat.schedules.list(ws)]})


async def get_schedule(request: Request):
    """
    summary: A job's schedule
    responses:
      200: {description: The schedule}
      404: {description: No such job, or it has no schedule}
    """
    ws, plat, job = _job_schedule(request)
    return ok(schedule_json(plat.schedules.get(ws, job), job.name))


async def put_schedule(request: Request):
    """
    summary: Set (or replace) a job's schedule; the platform runs its latest version then, with trigger=schedule
    requestBody:
      required: true
      content:
        application/json:
          schema:
            type: object
            description: "{cron, timezone?} or {every: seconds}; catchup: last|none|all; overlap: skip|allow|queue"
            properties:
              cron: {type: string, example: "0 2 * * *"}
              timezone: {type: string, example: Europe/Berlin}
              every: {type: number, minimum: 1}
              catchup: {type: string, enum: [last, none, all]}
              overlap: {type: string, enum: [skip, allow, queue]}
    responses:
      200: {description: The schedule}
      422: {description: Invalid cron expression, time zone, period or policy}
    """
    ws, plat, job = _job_schedule(request)
    if job.kind != "function":
        raise ValidationError("only functions can have a schedule")
    row = plat.schedules.set(ws, job, await json_body(request))
    return ok(schedule_json(row, job.name))


async def delete_schedule(request: Request):
    """
    summary: Delete a job's schedule
    responses:
      200: {description: Deleted}
      404: {description: The job has no schedule}
    """
    ws, plat, job = _job_schedule(request)
    plat.schedules.delete(ws, job)
    return ok({"deleted": job.name})


async def pause_schedule(request: Request):
    """
    summary: Pause a job's schedule (no runs until it is resumed)
    responses:
      200: {description: The schedule}
    """
    ws, plat, job = _job_schedule(request)
    return ok(schedule_json(plat.schedules.pause(ws, job, True), job.name))


async def resume_schedule(request: Request):
    """
    summary: Resume a job's schedule from its next fire time after now (fires while paused are not caught up)
    responses:
      200: {description: The schedule}
    """
    ws, plat, job = _job_schedule(request)
    return ok(schedule_json(plat.schedules.pause(ws, job, False), job.name))
