"""Routes for workspace secrets: admins write them; anyone of the workspace lists names and keys, never values."""

from __future__ import annotations

from starlette.requests import Request

from .http import json_body, ok
from .render import secret_json
from .routes_jobs import platform, workspace
from .routes_runs import admin


async def list_secrets(request: Request):
    """
    summary: The workspace's secrets, by name with their keys (never their values)
    responses:
      200: {description: Secrets}
    """
    ws = workspace(request)
    return ok({"secrets": [secret_json(s) for s in platform(request).secrets.list(ws)]})


async def put_secret(request: Request):
    """
    summary: Create or replace a secret (admin); its values are encrypted at rest and never returned
    description: >
      Jobs name it with @operator(secrets=[...]): each key becomes an environment variable of their runs and
      service replicas. Processes started from now on get the new values; warm workers leave for new ones.
    requestBody:
      required: true
      content:
        application/json:
          schema:
            type: object
            required: [values]
            properties:
              values: {type: object, additionalProperties: {type: string}, example: {HF_TOKEN: "hf_..."}}
    responses:
      200: {description: The secret's name and keys}
      403: {description: Not an admin token}
      422: {description: Invalid name, key or value}
      502: {description: The cluster refused the secret's Kubernetes Secret (kubernetes backend); nothing changed}
    """
    ws = admin(request, "write secrets")
    body = await json_body(request)
    row = await platform(request).secrets.set(ws, request.path_params["name"], body.get("values"))
    return ok(secret_json(row))


async def delete_secret(request: Request):
    """
    summary: Delete a secret (admin); runs of jobs that name it fail, saying so, until it is set again
    responses:
      200: {description: Deleted}
      403: {description: Not an admin token}
      404: {description: No such secret}
    """
    ws = admin(request, "delete secrets")
    await platform(request).secrets.delete(ws, request.path_params["name"])
    return ok({"deleted": request.path_params["name"]})
