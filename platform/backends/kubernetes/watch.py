"""A list-then-watch loop over one kind of object, in a thread, handing events to the event loop.

    list (a resync: every object, a page of ``page`` at a time with ``limit`` / ``continue``, so a
    relist of 100k objects is not one response; and the resourceVersion to watch from)
    watch from that resourceVersion (bookmarks keep it fresh) until the server ends the stream,
    then watch again from the last resourceVersion seen;
    on ``410 Gone`` (the version is too old: the server compacted its history) list again;
    on any other error (connection reset, API server restarting) wait a little and reconnect.

Events arrive as ``deliver(type, object)`` with plain dicts (the JSON the API server sent);
a resync delivers each listed object as ``MODIFIED`` as its page arrives, then
``deliver("SYNC", present, started)``: the (namespace, name) of every object listed, and the
monotonic time the list was asked for (objects made after it may be missing from ``present``).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import Callable

from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger("opbox.kubernetes")


class Watcher:
    def __init__(self, what: str, list_fn: Callable, deliver: Callable, *, label_selector: str | None = None,
                 field_selector: str | None = None, timeout: int = 300, max_delay: float = 10.0, page: int = 500):
        self.what = what
        self.list_fn = list_fn
        self.deliver = deliver
        self.selectors = {k: v for k, v in (("label_selector", label_selector), ("field_selector", field_selector)) if v}
        self.page = page
        self.timeout = timeout
        self.max_delay = max_delay
        self.resource_version: str | None = None
        self.relists = 0
        self.reconnects = 0
        self._stop = threading.Event()
        self._resp = None
        self._thread = threading.Thread(target=self._run, name=f"opbox-watch-{what}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        # closing the response from here would wait for the reading thread's lock: shut the
        # socket down instead, which ends the blocked read at once
        sock = getattr(getattr(self._resp, "connection", None), "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _list(self) -> None:
        started = time.monotonic()
        present, token = set(), None
        while True:  # a 410 on a page (its continue token expired) propagates: the loop lists again
            resp = self.list_fn(**self.selectors, limit=self.page, _continue=token, _preload_content=False,
                                _request_timeout=60)
            data = json.loads(resp.data)
            for item in data.get("items") or []:
                present.add((item["metadata"].get("namespace"), item["metadata"]["name"]))
                self.deliver("MODIFIED", item)
            if token is None:  # every page is of the first page's snapshot
                version = data["metadata"]["resourceVersion"]
            token = data["metadata"].get("continue")
            if not token:
                break
        self.resource_version = version
        self.relists += 1
        self.deliver("SYNC", present, started)

    def _watch(self) -> None:
        resp = self.list_fn(**self.selectors, watch=True, resource_version=self.resource_version,
                            allow_watch_bookmarks=True, timeout_seconds=self.timeout, _preload_content=False,
                            _request_timeout=(10, self.timeout + 30))
        self._resp = resp
        try:
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    return
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        log.info("watch of %s: resourceVersion %s expired; listing again", self.what,
                                 self.resource_version)
                        self.resource_version = None
                        return
                    raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if version:
                    self.resource_version = version
                if kind != "BOOKMARK":
                    self.deliver(kind, obj)
        finally:
            self._resp = None
            resp.close()
            resp.release_conn()

    def _run(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch()
                delay = 0.2
            except ApiException as exc:
                if exc.status == 410:
                    self.resource_version = None
                    continue
                self._pause(exc, delay)
                delay = min(delay * 2, self.max_delay)
            except Exception as exc:  # connection refused or reset, API server restarting, bad JSON
                self._pause(exc, delay)
                delay = min(delay * 2, self.max_delay)

    def _pause(self, exc: Exception, delay: float) -> None:
        if self._stop.is_set():
            return
        self.reconnects += 1
        log.warning("watch of %s failed (%s: %s); reconnecting in %.1f s", self.what, type(exc).__name__,
                    str(exc)[:300], delay)
        self._stop.wait(delay)
