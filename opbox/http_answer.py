"""An HTTP/1.1 answer read off a socket with httptools (llhttp, the parser uvicorn uses): the SDK's call path
(``opbox/wire.py``) and the runtime's line to the gateway (``runtime/channel.py``) share it. http.client's
header parsing (the ``email`` package) costs ~45 µs an answer; this a few µs."""

from __future__ import annotations

import socket

import httptools

READ_SIZE = 65536


class Disconnected(Exception):
    """The connection ended before the answer did."""


class Answer:
    """One answer read off a socket by httptools (its callbacks fill this): status, headers, body, and
    whether the connection may carry the next request. Interim (1xx) answers are skipped."""

    __slots__ = ("parser", "status", "headers", "body", "done", "keep_alive", "headers_done")

    def __init__(self):
        self.parser = httptools.HttpResponseParser(self)
        self.status, self.headers, self.body = 0, [], []
        self.done = self.keep_alive = self.headers_done = False

    def read(self, sock: socket.socket) -> None:
        while not self.done:
            data = sock.recv(READ_SIZE)
            if not data:
                if self.headers_done and self._until_close():  # an answer whose end is the connection's
                    self.status, self.done, self.keep_alive = self.parser.get_status_code(), True, False
                    return
                raise Disconnected("the server closed the connection before its answer was complete"
                                    if self.headers_done or self.headers else
                                    "Server disconnected without sending a response.")
            self.parser.feed_data(data)

    def _until_close(self) -> bool:
        names = {name.lower() for name, _ in self.headers}
        return "content-length" not in names and "transfer-encoding" not in names

    # httptools' callbacks
    def on_message_begin(self) -> None:
        if self.done:  # bytes after the answer: not ours to read, and the connection is not reused
            self.keep_alive = False
            return
        self.headers, self.body, self.headers_done = [], [], False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.done:
            self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if not self.done:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.done:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # interim: the answer follows
            return
        self.status, self.done, self.keep_alive = status, True, self.parser.should_keep_alive()


class Headers(dict):
    """An answer's headers by lower-cased name, looked up in any case (``headers["X-Opbox-Run"]``,
    ``headers.get(...)``); of a repeated name, its first value."""

    __slots__ = ()

    def __init__(self, pairs: list[tuple[str, str]]):
        super().__init__()
        for name, value in pairs:
            dict.setdefault(self, name.lower(), value)

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name) -> bool:
        return dict.__contains__(self, name.lower())

    def get(self, name: str, default=None):
        return dict.get(self, name.lower(), default)
