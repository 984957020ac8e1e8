"""``Job``: a deployed job by id or name: trigger it, read its versions and runs.

``Jobs`` is the same class under the name the first SDK used; both stay.
"""

from __future__ import annotations

from . import serialization, tracecontext
from .client import Client, default_client
from .offload import dump_call
from .remote import ENVELOPE, RemoteFunction, RunHandle
from .schedules import Schedule


class Job:
    def __init__(self, ref: str, client: Client | None = None):
        self.ref = ref
        self.client = client or default_client()

    def __repr__(self) -> str:
        return f"Job({self.ref!r})"

    @staticmethod
    def list(client: Client | None = None) -> list[dict]:
        return (client or default_client()).get("/jobs").json()["jobs"]

    def info(self) -> dict:
        return self.client.get(f"/job/{self.ref}").json()

    def versions(self) -> list[dict]:
        return self.client.get(f"/job/{self.ref}/versions").json()["versions"]

    def runs(self, limit: int = 50, status: str | None = None) -> list[dict]:
        params = {"limit": limit, **({"status": status} if status else {})}
        return self.client.get(f"/job/{self.ref}/runs", params=params).json()["runs"]

    def trigger(self, *args, version: int | None = None, **kwargs) -> RunHandle:
        """Start a run of the latest version (or ``version``); without arguments, the function's defaults."""
        params = {"version": version} if version else {}
        if args or kwargs:
            resp = self.client.post(f"/job/{self.ref}/trigger", content=dump_call(self.client, args, kwargs),
                                    headers=tracecontext.caller_headers(ENVELOPE), params=params)
        else:
            resp = self.client.post(f"/job/{self.ref}/trigger", json={}, params=params,
                                    headers=tracecontext.caller_headers())
        return RunHandle(resp.json()["run_id"], self.client)

    def schedule(self, spec: Schedule | None) -> dict | None:
        """Set the job's schedule (``Cron(...)``, ``Period(...)``), or with None delete it."""
        if spec is None:
            self.client.request("DELETE", f"/job/{self.ref}/schedule")
            return None
        return self.client.request("PUT", f"/job/{self.ref}/schedule", json=spec.to_dict()).json()

    def remote(self, version: int | None = None) -> RemoteFunction:
        job = self.info()
        return RemoteFunction(job["id"], job["name"], version, self.client)


Jobs = Job  # the seed's name
