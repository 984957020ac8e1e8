"""The fake API server's HTTP face: the REST paths the kubernetes Python client calls.

    /api/v1/namespaces[/{name}]                                       Namespaces
    /api/v1/namespaces/{ns}/{pods,secrets,serviceaccounts}[/{name}]   and /api/v1/{pods,secrets} (all namespaces)
    /api/v1/namespaces/{ns}/pods/{name}/log                           a pod's output (tailLines, follow...)
    /apis/batch/v1/[namespaces/{ns}/]jobs[/{name}]
    /apis/serving.knative.dev/v1/[namespaces/{ns}/]services[/{name}]

GET (one, list, ``?watch=1`` with resourceVersion / timeoutSeconds / labelSelector), POST,
PUT (replace, with resourceVersion conflicts), PATCH (merge and JSON patch), DELETE (with
propagationPolicy and gracePeriodSeconds, from the query or a DeleteOptions body). Every
object created or replaced must pass the validators of tests/k8s_schemas.py; one that does
not is refused with 422 Invalid and recorded in ``store.rejected``.

Before an object is stored, admission.py does what the real control plane does beyond the schema
(defaults, names and labels, immutable fields, Knative's webhooks, PodSecurity and quota for
pods); lists honour ``limit`` / ``continue`` and ``fieldSelector``.

Test hooks: POST /_fake/compact (watch history gone: resuming gets 410), POST
/_fake/disconnect (every watch stream ends), POST /_fake/expire (both at once), GET /_fake/state,
POST /_fake/evict (the kubelet evicts a pod), POST /_fake/nodes/{name}/lose (a node is lost),
POST /_fake/node (hold rollouts, make pulls fail).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from . import admission
from .admission import Refused
from .store import Store, field_matches, matches, parse_selector

KINDS = {  # (group, version, plural) -> (kind, namespaced)
    ("", "v1", "namespaces"): ("Namespace", False),
    ("", "v1", "pods"): ("Pod", True),
    ("", "v1", "secrets"): ("Secret", True),
    ("", "v1", "serviceaccounts"): ("ServiceAccount", True),
    ("", "v1", "nodes"): ("Node", False),
    ("", "v1", "events"): ("Event", True),
    ("", "v1", "resourcequotas"): ("ResourceQuota", True),
    ("", "v1", "limitranges"): ("LimitRange", True),
    ("networking.k8s.io", "v1", "networkpolicies"): ("NetworkPolicy", True),
    ("batch", "v1", "jobs"): ("Job", True),
    ("serving.knative.dev", "v1", "services"): ("Service", True),
}


def refused(exc: Refused) -> JSONResponse:
    return status(exc.code, exc.reason, exc.message)


def status(code: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                         "message": message, "reason": reason, "code": code}, status_code=code)


def merge_patch(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def json_patch(target: dict, ops: list) -> dict:
    doc = copy.deepcopy(target)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        node = doc
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        last = parts[-1]
        if op["op"] in ("add", "replace"):
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), op["value"]) if op["op"] == "add" else \
                    node.__setitem__(int(last), op["value"])
            else:
                node[last] = op["value"]
        elif op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
    return doc


class Api:
    def __init__(self, store: Store, node, validator):
        self.store, self.node, self.validator = store, node, validator

    # -- helpers ------------------------------------------------------------------------
    def _target(self, request: Request):
        p = request.path_params
        group = p.get("group", "")
        version = p.get("version", "v1")
        plural = p["plural"]
        info = KINDS.get((group, version, plural))
        return group, version, plural, info

    def _validate(self, obj: dict) -> list[str]:
        body = {k: v for k, v in obj.items() if k != "status"}
        errors = self.validator.errors(body) if self.validator else []
        if errors:
            self.store.rejected.append(f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}: {errors}")
        return errors

    def _admit(self, plural: str, kind: str, obj: dict, old: dict | None) -> None:
        """What happens after the schema check (admission.py): defaults, the API server's validation,
        immutable fields, Knative's webhooks, pod admission. Raises Refused."""
        meta = obj["metadata"]
        if old is None:
            meta.setdefault("uid", str(uuid.uuid4()))  # the Job's generated selector names it
        admission.default(plural, obj, old)
        try:
            if plural == "secrets":
                admission.decode_secret(obj)
            if plural == "services":
                admission.knative_webhook(obj, old)
            else:
                errors = admission.validate(plural, obj)
                if errors:
                    raise Refused(422, "Invalid", f"{kind} {meta.get('name')!r} is invalid: " + "; ".join(errors))
            if old is not None:
                admission.check_update(plural, old, obj)
        except Refused as exc:
            self.store.rejected.append(f"{kind}/{meta.get('name')}: {exc.message}")
            raise
        if plural == "pods" and old is None:
            admission.admit_pod(self.store, obj)
        elif old is None:
            admission.admit_count(self.store, plural, obj)

    def _list(self, request: Request, api_version: str, kind: str, plural: str, namespace, selector, fields):
        """A list, a page at a time with ``limit`` / ``continue`` (the token: the last name sent)."""
        items = [o for o in self.store.list(plural, namespace, selector) if field_matches(o, fields)]
        params = request.query_params
        after = params.get("continue")
        if after:
            try:
                after = base64.urlsafe_b64decode(after.encode()).decode()
            except ValueError:
                return status(400, "BadRequest", "invalid continue token")
            items = [o for o in items if self._order(o) > tuple(json.loads(after))]
        meta = {"resourceVersion": str(self.store.rv)}
        limit = int(params.get("limit") or 0)
        if limit and len(items) > limit:
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(self._order(items[-1])).encode()).decode()
        self.store.pages += 1
        return JSONResponse({"apiVersion": api_version, "kind": f"{kind}List", "metadata": meta, "items": items})

    @staticmethod
    def _order(obj: dict) -> tuple[str, str]:
        return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]

    @staticmethod
    def _secret_data(obj: dict) -> None:
        if obj.get("kind") == "Secret" and "stringData" in obj:
            data = obj.setdefault("data", {})
            for key, value in obj.pop("stringData").items():
                data[key] = base64.b64encode(value.encode()).decode()

    # -- collections --------------------------------------------------------------------
    async def collection(self, request: Request):
        group, version, plural, info = self._target(request)
        if info is None:
            return status(404, "NotFound", f"the server could not find the requested resource ({plural})")
        kind, namespaced = info
        namespace = request.path_params.get("ns")
        self.store.requests.append((request.method, request.url.path))
        self.store.queries.append((request.method, request.url.path, dict(request.query_params)))
        if request.method == "GET":
            selector = parse_selector(request.query_params.get("labelSelector"))
            fields = parse_selector(request.query_params.get("fieldSelector"))
            if (request.query_params.get("watch") or "").lower() in ("1", "true"):  # ParseBool, as Go does
                return self._watch(request, plural, namespace, selector, fields)
            return self._list(request, f"{group}/{version}".lstrip("/"), kind, plural, namespace, selector, fields)
        body = await request.json()
        if body.get("kind") != kind:
            return status(400, "BadRequest", f"expected kind {kind}, got {body.get('kind')!r}")
        meta = body.setdefault("metadata", {})
        if namespaced:
            if meta.setdefault("namespace", namespace) != namespace:
                return status(400, "BadRequest", "the namespace of the object does not match the path")
            if self.store.get("namespaces", None, namespace) is None:
                return status(404, "NotFound", f'namespaces "{namespace}" not found')
        errors = self._validate(body)
        if errors:
            return status(422, "Invalid", f"{kind} {meta.get('name')!r} is invalid: " + "; ".join(errors))
        try:
            self._admit(plural, kind, body, None)
        except Refused as exc:
            return refused(exc)
        if self.store.get(plural, namespace, meta.get("name", "")) is not None:
            return status(409, "AlreadyExists", f'{plural} "{meta.get("name")}" already exists')
        self._secret_data(body)
        created = self.store.create(plural, body)
        self.node.created(plural, created)
        return JSONResponse(created, status_code=201)

    def _watch(self, request: Request, plural: str, namespace: str | None, selector, fields) -> StreamingResponse:
        store = self.store
        since = request.query_params.get("resourceVersion")
        timeout = float(request.query_params.get("timeoutSeconds") or 1800)
        queue: asyncio.Queue = asyncio.Queue()
        store.watchers.add(queue)

        def wanted(resource: str, obj: dict) -> bool:
            return (resource == plural and (namespace is None or obj["metadata"].get("namespace") == namespace)
                    and matches(obj, selector) and field_matches(obj, fields))

        def line(kind: str, obj: dict) -> bytes:
            return (json.dumps({"type": kind, "object": obj}) + "\n").encode()

        async def stream():
            try:
                last = store.rv
                if since and since != "0":
                    if int(since) < store.oldest:
                        yield line("ERROR", {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                                             "reason": "Expired", "message": f"too old resource version: {since}"})
                        return
                    for rv, resource, kind, obj in list(store.history):
                        if rv > int(since) and rv <= last and wanted(resource, obj):
                            yield line(kind, obj)
                else:
                    for obj in store.list(plural, namespace, selector):
                        if field_matches(obj, fields):
                            yield line("ADDED", obj)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
                    except asyncio.TimeoutError:
                        return
                    if event is None:  # disconnect
                        return
                    rv, resource, kind, obj = event
                    if rv > last and wanted(resource, obj):
                        yield line(kind, obj)
            finally:
                store.watchers.discard(queue)

        return StreamingResponse(stream(), media_type="application/json")

    # -- one object ---------------------------------------------------------------------
    async def item(self, request: Request):
        group, version, plural, info = self._target(request)
        if info is None:
            return status(404, "NotFound", f"the server could not find the requested resource ({plural})")
        kind, _ = info
        namespace, name = request.path_params.get("ns"), request.path_params["name"]
        self.store.requests.append((request.method, request.url.path))
        current = self.store.get(plural, namespace, name)
        if current is None:
            return status(404, "NotFound", f'{plural} "{name}" not found')
        if request.method == "GET":
            return JSONResponse(current)
        if request.method == "DELETE":
            options = {}
            raw = await request.body()
            if raw:
                options = json.loads(raw)
            policy = request.query_params.get("propagationPolicy") or options.get("propagationPolicy")
            grace = request.query_params.get("gracePeriodSeconds") or options.get("gracePeriodSeconds")
            gone = self.node.delete(plural, current, policy, None if grace is None else int(grace))
            return JSONResponse(gone)
        if request.method == "PUT":
            body = await request.json()
            sent = body.get("metadata", {}).get("resourceVersion")
            if sent and sent != current["metadata"]["resourceVersion"]:
                return status(409, "Conflict", f'the object has been modified; please apply your changes to the '
                                               f'latest version and try again ({sent} != '
                                               f'{current["metadata"]["resourceVersion"]})')
            merged = body
        else:  # PATCH
            patch = await request.json()
            if request.headers.get("content-type", "").startswith("application/json-patch"):
                merged = json_patch(current, patch)
            else:
                merged = merge_patch(current, patch)
        merged.setdefault("metadata", {})
        for key in ("uid", "creationTimestamp", "namespace", "name"):
            if key in current["metadata"]:
                merged["metadata"][key] = current["metadata"][key]
        if "status" in current and "status" not in merged:
            merged["status"] = current["status"]
        errors = self._validate(merged)
        if errors:
            return status(422, "Invalid", f"{kind} {name!r} is invalid: " + "; ".join(errors))
        try:
            self._admit(plural, kind, merged, current)
        except Refused as exc:
            return refused(exc)
        self._secret_data(merged)
        if merged.get("spec") != current.get("spec"):
            merged["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        updated = self.store.put(plural, merged)
        self.node.updated(plural, updated)
        return JSONResponse(updated)

    async def pod_log(self, request: Request):
        """A pod's output: ``tailLines``, ``limitBytes``, ``container``, and ``follow`` (streams
        until the container ended or the pod is gone, as the kubelet does)."""
        namespace, name = request.path_params["ns"], request.path_params["name"]
        self.store.requests.append((request.method, request.url.path))
        pod = self.store.get("pods", namespace, name)
        if pod is None:
            return status(404, "NotFound", f'pods "{name}" not found')
        params = request.query_params
        containers = [c["name"] for c in pod["spec"].get("containers") or []]
        container = params.get("container")
        if container is None and len(containers) > 1:
            return status(400, "BadRequest", f"a container name must be specified for pod {name}, "
                                             f"choose one of: {containers}")
        if container is not None and container not in containers:
            return status(400, "BadRequest", f"container {container} is not valid for pod {name}")
        # the node keeps the output of a pod's first container; others (Knative's queue-proxy) print nothing
        first = container is None or container == containers[0]
        full = text = self.node.pod_log(namespace, name) if first else ""
        tail = params.get("tailLines")
        if tail:
            text = "".join(text.splitlines(keepends=True)[-int(tail):])
        limit = params.get("limitBytes")
        if limit:
            text = text.encode()[:int(limit)].decode(errors="ignore")
        if (params.get("follow") or "").lower() not in ("1", "true"):
            return PlainTextResponse(text)
        uid = pod["metadata"]["uid"]

        async def follow():
            sent = len(full.encode())
            yield text.encode()
            while True:
                current = self.store.get("pods", namespace, name)
                ended = current is None or current["metadata"]["uid"] != uid or \
                    current["status"].get("phase") in ("Succeeded", "Failed")
                data = self.node.pod_log(namespace, name).encode() if current is not None and first else b""
                if len(data) > sent:
                    yield data[sent:]
                    sent = len(data)
                if ended:
                    return
                await asyncio.sleep(0.1)

        return StreamingResponse(follow(), media_type="text/plain")

    # -- test hooks ---------------------------------------------------------------------
    async def compact(self, request: Request):
        self.store.compact()
        return JSONResponse({"oldest": self.store.oldest})

    async def expire(self, request: Request):
        """compact + disconnect at once: every watch must list again (its next resume gets 410)."""
        self.store.compact()
        self.store.disconnect()
        return JSONResponse({"oldest": self.store.oldest})

    async def disconnect(self, request: Request):
        self.store.disconnect()
        return JSONResponse({"watches": len(self.store.watchers)})

    async def evict(self, request: Request):
        body = await request.json()
        done = self.node.evict(body["namespace"], body["name"], body.get("message") or
                               "The node was low on resource: memory.")
        return JSONResponse({"evicted": done}, status_code=200 if done else 404)

    async def lose_node(self, request: Request):
        return JSONResponse({"pods": self.node.lose_node(request.path_params["name"])})

    async def node_settings(self, request: Request):
        """Test knobs of the simulated node: ``hold_rollouts``, ``progress_deadline``, ``pod_start_delay``,
        ``pull_failures`` {image: count}."""
        body = await request.json()
        if "hold_rollouts" in body:
            self.node.hold_rollouts = bool(body["hold_rollouts"])
        if "progress_deadline" in body:
            self.node.progress_deadline = float(body["progress_deadline"])
        if "pod_start_delay" in body:
            self.node.pod_start_delay = float(body["pod_start_delay"])
        self.node.pull_failures.update(body.get("pull_failures") or {})
        return JSONResponse({"hold_rollouts": self.node.hold_rollouts, "pull_failures": self.node.pull_failures})

    async def state(self, request: Request):
        return JSONResponse({"resourceVersion": self.store.rv, "rejected": self.store.rejected,
                             "created": self.store.created,
                             "watches": len(self.store.watchers),
                             "objects": sorted("/".join(k) for k in self.store.objects)})

    def app(self) -> Starlette:
        methods_c = ["GET", "POST"]
        methods_i = ["GET", "PUT", "PATCH", "DELETE"]
        return Starlette(routes=[
            Route("/_fake/compact", self.compact, methods=["POST"]),
            Route("/_fake/disconnect", self.disconnect, methods=["POST"]),
            Route("/_fake/expire", self.expire, methods=["POST"]),
            Route("/_fake/state", self.state, methods=["GET"]),
            Route("/_fake/evict", self.evict, methods=["POST"]),
            Route("/_fake/nodes/{name}/lose", self.lose_node, methods=["POST"]),
            Route("/_fake/node", self.node_settings, methods=["POST"]),
            Route("/api/v1/namespaces/{ns}/pods/{name}/log", self.pod_log, methods=["GET"]),
            Route("/api/v1/namespaces/{ns}/{plural}/{name}", self.item, methods=methods_i),
            Route("/api/v1/namespaces/{ns}/{plural}", self.collection, methods=methods_c),
            Route("/api/v1/{plural}/{name}", self.item, methods=methods_i),
            Route("/api/v1/{plural}", self.collection, methods=methods_c),
            Route("/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}", self.item, methods=methods_i),
            Route("/apis/{group}/{version}/namespaces/{ns}/{plural}", self.collection, methods=methods_c),
            Route("/apis/{group}/{version}/{plural}", self.collection, methods=methods_c),
        ])
