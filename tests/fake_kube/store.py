"""The fake API server's state: objects by (resource, namespace, name), one resourceVersion counter,
an event history for watches (``compact()`` drops it, so resuming from an older version gets
410 Gone, as after etcd compaction), and the queues of open watches.

Everything runs on the server's event loop thread: no locks.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import uuid
from collections import deque

NAMESPACED = {"pods", "secrets", "serviceaccounts", "jobs", "services", "events", "resourcequotas", "limitranges",
              "networkpolicies"}


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_selector(text: str | None) -> list[tuple[str, str, str | None]]:
    """``a=b,c!=d,e`` -> [(key, op, value)]; ops "=", "!=", "exists"."""
    out = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "!=" in part:
            key, value = part.split("!=", 1)
            out.append((key.strip(), "!=", value.strip()))
        elif "=" in part:
            key, value = part.split("=", 1)
            out.append((key.strip().rstrip("="), "=", value.strip()))
        else:
            out.append((part, "exists", None))
    return out


def matches(obj: dict, selector: list) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for key, op, value in selector:
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:
            return False
        if op == "exists" and key not in labels:
            return False
    return True


def field_matches(obj: dict, selector: list) -> bool:
    """A field selector (``involvedObject.name=x,reason=FailedCreate``) over dotted paths."""
    for key, op, value in selector:
        node = obj
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        found = "" if node is None else str(node)
        if (op == "=" and found != value) or (op == "!=" and found == value):
            return False
    return True


class Store:
    def __init__(self, history: int = 100_000):
        self.rv = 0
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.history: deque = deque(maxlen=history)
        self.oldest = 0  # resume from a resourceVersion below this: 410 Gone
        self.watchers: set[asyncio.Queue] = set()
        self.requests: list[tuple[str, str]] = []  # (verb, path) of every API call
        self.queries: list[tuple[str, str, dict]] = []  # (verb, path, query) of every call on a collection
        self.rejected: list[str] = []  # objects that failed validation
        self.pages = 0  # list responses sent (a paginated list sends several)
        self.created: dict[str, int] = {}  # objects created, by resource (the API's and the controllers')

    def key(self, resource: str, namespace: str | None, name: str) -> tuple[str, str, str]:
        return (resource, (namespace or "") if resource in NAMESPACED else "", name)

    def get(self, resource: str, namespace: str | None, name: str) -> dict | None:
        return self.objects.get(self.key(resource, namespace, name))

    def list(self, resource: str, namespace: str | None = None, selector: list | None = None) -> list[dict]:
        return [copy.deepcopy(o) for (res, ns, _), o in sorted(self.objects.items())
                if res == resource and (namespace is None or ns == namespace) and matches(o, selector or [])]

    def _event(self, resource: str, kind: str, obj: dict) -> None:
        event = (self.rv, resource, kind, copy.deepcopy(obj))
        self.history.append(event)
        if len(self.history) == self.history.maxlen:
            self.oldest = self.history[0][0]
        for queue in list(self.watchers):
            queue.put_nowait(event)

    def create(self, resource: str, obj: dict) -> dict:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", now())
        meta.setdefault("generation", 1)
        self.created[resource] = self.created.get(resource, 0) + 1
        return self.put(resource, obj, "ADDED")

    def put(self, resource: str, obj: dict, kind: str = "MODIFIED") -> dict:
        self.rv += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self.rv)
        self.objects[self.key(resource, meta.get("namespace"), meta["name"])] = obj
        self._event(resource, kind, obj)
        return copy.deepcopy(obj)

    def remove(self, resource: str, namespace: str | None, name: str) -> dict | None:
        obj = self.objects.pop(self.key(resource, namespace, name), None)
        if obj is not None:
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self._event(resource, "DELETED", obj)
        return obj

    def compact(self) -> None:
        """Forget the event history: watches resuming from before now get 410 Gone."""
        self.history.clear()
        self.oldest = self.rv + 1

    def disconnect(self) -> None:
        """End every open watch stream (as an API server restart does)."""
        for queue in list(self.watchers):
            queue.put_nowait(None)
