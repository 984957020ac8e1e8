"""LocalStore: the ObjectStore contract, and its signed URLs served by a real uvicorn server."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.applications import Starlette

from opbox.errors import ConfigError, Conflict, ValidationError
from opbox.http_protocol import http_protocol
from opbox.platform.store import LocalStore, open_store
from opbox.platform.store.local import TMP_PREFIX
from conftest import require
from servers import serve_app
from store_contract import StoreContract, send

SECRET = b"local-store-test-secret"


@pytest.fixture(scope="module", params=["uvicorn", "opbox"])
def served(request, tmp_path_factory) -> tuple[Path, str]:
    """A store folder and the base URL of a live server for it: uvicorn as it comes, and with the gateway's
    HTTP protocol (downloads sent with os.sendfile)."""
    root = tmp_path_factory.mktemp("local-store")
    # The server side only needs the folder and the secret, as in a multi-process gateway.
    app = Starlette(routes=LocalStore(root, SECRET, "http://unused").routes())
    protocol = {"http": http_protocol("/_store/")} if request.param == "opbox" else {}
    with serve_app(app, **protocol) as base_url:
        yield root, base_url


@pytest.fixture
def store(served) -> LocalStore:
    root, base_url = served
    for child in root.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    return LocalStore(root, SECRET, base_url)


def leftovers(store: LocalStore) -> list[Path]:
    return list(store.root.rglob(TMP_PREFIX + "*"))


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(item.split("=", 1) for item in parts.query.split("&"))
    query.update(changes)
    return parts._replace(query="&".join(f"{k}={v}" for k, v in query.items())).geturl()


class TestLocalContract(StoreContract):
    pass


class TestSignedUrls:
    def test_url_shape(self, store):
        req = store.upload_url("a/b c.bin", expires=60, max_size=10)
        parts = urlsplit(req.url)
        assert req.url.startswith(store.base_url + "/_store/a/b%20c.bin?")
        assert [p.split("=")[0] for p in parts.query.split("&")] == ["op", "exp", "max", "sig"]
        assert abs(int(dict(p.split("=") for p in parts.query.split("&"))["exp"]) - time.time() - 60) < 5

    def test_expired_url_is_forbidden(self, store, monkeypatch):
        store.put("old", b"data")
        with monkeypatch.context() as m:
            m.setattr(time, "time", lambda real=time.time: real() - 3600)
            up, down = store.upload_url("new", expires=60), store.download_url("old", expires=60)
        for req, body in ((up, b"x"), (down, None)):
            answer = send(req, body)
            assert answer.status_code == 403
            assert answer.json() == {"error": "forbidden", "message": "the signed URL has expired"}
        assert not store.exists("new")

    @pytest.mark.parametrize(
        "tamper",
        [
            lambda url: url[:-1] + ("0" if url[-1] != "0" else "1"),  # signature
            lambda url: url.replace("/_store/target", "/_store/other"),  # key
            lambda url: with_query(url, op="get"),  # op
            lambda url: with_query(url, max="100000000"),  # size limit
            lambda url: with_query(url, exp=str(int(time.time()) + 99999)),  # expiry
            lambda url: url.split("&sig=")[0],  # no signature
            lambda url: url + "&sig=00",  # two signatures
        ],
        ids=["sig", "key", "op", "max", "exp", "nosig", "twosigs"],
    )
    def test_tampered_upload_is_forbidden(self, store, tamper):
        req = store.upload_url("target", expires=60, max_size=1000)
        answer = httpx.put(tamper(req.url), content=b"evil", headers=req.headers)
        assert answer.status_code == 403, answer.text
        assert answer.json()["error"] == "forbidden"
        assert list(store.list()) == [] and leftovers(store) == []

    def test_tampered_download_is_forbidden(self, store):
        store.put("mine", b"1")
        store.put("theirs", b"2")
        url = store.download_url("mine").url
        assert httpx.get(url.replace("/mine?", "/theirs?")).status_code == 403
        assert httpx.get(url[:-2] + "00").status_code == 403
        upload = store.upload_url("mine").url
        assert httpx.get(upload).status_code == 403  # a PUT URL does not read
        assert httpx.put(url, content=b"x").status_code == 403  # a GET URL does not write
        assert store.get("mine") == b"1"

    def test_oversize_upload_is_rejected(self, store):
        req = store.upload_url("big", max_size=1000)
        answer = send(req, b"x" * 1001)
        assert answer.status_code == 413
        assert answer.json()["error"] == "payload_too_large"
        assert not store.exists("big") and leftovers(store) == []

        def chunks():  # no Content-Length: the limit is enforced while streaming
            for _ in range(10):
                yield b"y" * 300

        answer = httpx.put(req.url, content=chunks(), headers=req.headers)
        assert answer.status_code == 413
        assert not store.exists("big") and leftovers(store) == []
        assert send(req, b"z" * 1000).status_code == 200  # exactly the limit is fine
        assert store.size("big") == 1000

    def test_upload_without_limit_and_overwrite(self, store):
        store.put("obj", b"old")
        assert send(store.upload_url("obj"), b"n" * 3_000_000).status_code == 200
        assert store.get("obj") == b"n" * 3_000_000

    def test_download_missing_is_404_and_head_works(self, store):
        answer = send(store.download_url("absent"))
        assert answer.status_code == 404
        assert answer.json()["error"] == "not_found"
        store.put("here", b"12345")
        head = httpx.head(store.download_url("here").url)
        assert head.status_code == 200 and head.headers["content-length"] == "5"

    @pytest.mark.parametrize("sent", [5000, 3 * 1024 * 1024])  # before, and after, writes to the temp file began
    def test_broken_upload_leaves_nothing(self, store, sent):
        url = urlsplit(store.upload_url("partial").url)

        def wait_for(condition) -> None:
            deadline = time.monotonic() + 5
            while not condition() and time.monotonic() < deadline:
                time.sleep(0.02)

        with socket.create_connection((url.hostname, url.port)) as sock:
            sock.sendall(
                f"PUT {url.path}?{url.query} HTTP/1.1\r\nHost: x\r\nContent-Length: {2 * sent}\r\n\r\n".encode()
                + b"a" * sent
            )
            wait_for(lambda: leftovers(store))
            assert leftovers(store), "the upload should be under way in a temp file"
            assert not store.exists("partial")  # ... which no reader sees
        wait_for(lambda: not leftovers(store))  # the client went away: the temp file goes too
        assert not store.exists("partial") and leftovers(store) == []


class TestLocalSpecifics:
    def test_temp_names_are_not_keys(self, store):
        with pytest.raises(ValidationError):
            store.put(f"a/{TMP_PREFIX}x", b"")

    def test_object_and_folder_clash(self, store):
        store.put("a", b"file")
        with pytest.raises(Conflict):
            store.put("a/b", b"")
        store.put("d/e", b"")
        with pytest.raises(Conflict):
            store.put("d", b"")
        assert not store.exists("d")  # a folder of keys is no object
        store.delete("d")

    def test_list_is_in_string_order(self, store):
        keys = ["a/b", "a/c/d", "a.txt", "a0", "ab/x", "b"]
        for key in reversed(keys):
            store.put(key, b"")
        assert list(store.list()) == sorted(keys)  # as AWS S3 lists
        assert list(store.list("a")) == sorted(keys[:-1])

    def test_delete_prunes_empty_folders(self, store):
        store.put("x/y/z", b"")
        store.delete("x/y/z")
        assert list(store.root.iterdir()) == []

    def test_open_store(self, tmp_path):
        by_url = open_store(f"file://{tmp_path}/s", secret="s", base_url="http://h/")
        by_path = open_store(str(tmp_path / "s"), secret=b"s", base_url="http://h", endpoint_url="ignored")
        assert isinstance(by_url, LocalStore) and by_url.root == by_path.root == tmp_path / "s"
        by_url.put("k", b"v")
        assert by_path.get("k") == b"v"
        assert by_url.upload_url("k").url.startswith("http://h/_store/k?")
        with pytest.raises(ConfigError, match="secret"):
            open_store(str(tmp_path), base_url="http://h")
        with pytest.raises(ConfigError, match="scheme"):
            open_store("ftp://host/x", secret="s", base_url="http://h")
        with pytest.raises(ConfigError, match="unknown"):
            open_store(str(tmp_path), secret="s", base_url="http://h", colour="red")


class TestSendfile:
    """On the gateway's protocol a download goes from the file to the socket with os.sendfile."""

    @pytest.fixture
    def sendfiles(self, monkeypatch) -> list[int]:
        """The sizes sendfile sent, call by call (the server runs in this process)."""
        import os

        sent, real = [], os.sendfile

        def counted(*args):
            n = real(*args)
            sent.append(n)
            return n
        monkeypatch.setattr(os, "sendfile", counted)
        return sent

    def test_a_download_is_sent_whole_by_sendfile(self, store, served, sendfiles, request):
        data = bytes(range(256)) * (12 * 1024 * 1024 // 256 + 1)  # not a multiple of any buffer
        store.put("big/blob", data)
        got = httpx.get(store.download_url("big/blob").url, timeout=30)
        assert got.status_code == 200 and got.headers["content-length"] == str(len(data))
        assert got.content == data
        if request.node.callspec.params["served"] == "opbox":
            assert sum(sendfiles) == len(data)
        else:
            assert sendfiles == []  # plain uvicorn: starlette reads the file in chunks

    def test_a_reader_that_leaves_midway_leaves_the_server_serving(self, store, served, sendfiles):
        data = b"x" * (16 * 1024 * 1024)
        store.put("big/left", data)
        url = store.download_url("big/left").url
        for _ in range(3):
            with httpx.stream("GET", url, timeout=30) as resp:
                assert resp.status_code == 200
                next(resp.iter_raw(1024 * 1024))
            # closed with most of the body unread
        assert httpx.get(url, timeout=30).content == data
        head = httpx.head(url, timeout=30)
        assert head.status_code == 200 and head.headers["content-length"] == str(len(data)) and head.content == b""
        ranged = httpx.get(url, headers={"Range": "bytes=10-19"}, timeout=30)
        assert ranged.status_code == 206 and ranged.content == data[10:20]


class TestLeanUploads:
    """On the gateway's protocol a large PUT's body goes from the socket into reused buffers and on to the file
    (``opbox.http_body``), not through uvicorn's ``receive``; the connection then carries the next request."""

    @pytest.fixture(scope="class")
    @classmethod
    def lean(cls, tmp_path_factory) -> LocalStore:
        root = tmp_path_factory.mktemp("lean-store")
        app = Starlette(routes=LocalStore(root, SECRET, "http://unused").routes())
        with serve_app(app, http=http_protocol("/_store/")) as base_url:
            yield LocalStore(root, SECRET, base_url)

    @pytest.fixture
    def receivers(self, monkeypatch) -> list[int]:
        """The body lengths the lean path took, upload by upload (the server runs in this process)."""
        from opbox import http_body

        taken, real = [], http_body.BodyReceiver.__init__

        def counted(self, owner, transport, remaining, head, *rest):
            taken.append(remaining + len(head))
            real(self, owner, transport, remaining, head, *rest)
        monkeypatch.setattr(http_body.BodyReceiver, "__init__", counted)
        return taken

    def test_uploads_on_one_connection_arrive_whole(self, lean, receivers):
        sizes = [3 * 1024 * 1024 + 7, 256 * 1024, 1024 * 1024, 5 * 1024 * 1024 - 1]
        # the uploads one after the other on one connection; the downloads on another: a PUT that arrives while
        # uvicorn still counts a sendfile answer before it as in progress is pipelined, and read as any body
        with httpx.Client(timeout=30) as http, httpx.Client(timeout=30) as reader:
            for n, size in enumerate(sizes):
                data = bytes(range(251)) * (size // 251) + b"e" * (size % 251)  # not a multiple of any buffer
                req = lean.upload_url(f"lean/{n}", max_size=size)
                answer = http.put(req.url, content=data, headers=req.headers)  # the same connection goes on
                assert answer.status_code == 200 and answer.json() == {"key": f"lean/{n}", "size": size}
                assert lean.get(f"lean/{n}") == data
                assert reader.get(lean.download_url(f"lean/{n}").url).content == data
        # (a body of up to ~300 KiB may have come whole with its head; uvicorn stops reading at 64 KiB)
        assert receivers[0] == sizes[0] and receivers[-1] == sizes[-1] and set(receivers) <= set(sizes)
        assert leftovers(lean) == []

    def test_concurrent_uploads_each_arrive_whole(self, lean, receivers):
        blobs = {f"lean/many/{n}": bytes([n]) * (2 * 1024 * 1024 + n) for n in range(6)}

        def upload(key: str) -> int:
            return send(lean.upload_url(key), blobs[key]).status_code

        with ThreadPoolExecutor(len(blobs)) as pool:
            assert list(pool.map(upload, blobs)) == [200] * len(blobs)
        assert all(lean.get(key) == data for key, data in blobs.items())
        assert sorted(receivers) == sorted(len(data) for data in blobs.values()) and leftovers(lean) == []

    def test_a_bound_digest_is_checked(self, lean):
        data = b"d" * (2 * 1024 * 1024)
        good = hashlib.sha256(data).hexdigest()
        assert send(lean.upload_url("lean/sum", sha256=good), data).status_code == 200
        wrong = send(lean.upload_url("lean/bad", sha256=good), data[:-1] + b"e")
        assert wrong.status_code == 400 and "sha256" in wrong.json()["message"]
        assert not lean.exists("lean/bad") and leftovers(lean) == []

    def test_expect_continue_and_a_pipelined_request(self, lean, receivers):
        data = b"c" * (1024 * 1024 + 3)
        put = urlsplit(lean.upload_url("lean/continue").url)
        lean.put("lean/small", b"small")
        get = urlsplit(lean.download_url("lean/small").url)
        with socket.create_connection((put.hostname, put.port), timeout=30) as sock:
            sock.sendall(f"PUT {put.path}?{put.query} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
                         "Expect: 100-continue\r\n\r\n".encode())
            assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(data + f"GET {get.path}?{get.query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            answers = b""
            while answers.count(b"HTTP/1.1 200") < 2 or not answers.endswith(b"small"):
                more = sock.recv(65536)
                assert more, answers
                answers += more
        assert answers.startswith(b"HTTP/1.1 200") and b'"size":1048579' in answers
        assert lean.get("lean/continue") == data and receivers == [len(data)]

    def test_a_full_disk_answers_507_and_leaves_nothing(self, tmp_path):
        require(os.geteuid() == 0, "mounting a small tmpfs for the store needs root")
        root = tmp_path / "small"
        root.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)], check=True)
        try:
            app = Starlette(routes=LocalStore(root, SECRET, "http://unused").routes())
            with serve_app(app, http=http_protocol("/_store/")) as base_url, httpx.Client(timeout=30) as http:
                store = LocalStore(root, SECRET, base_url)
                req = store.upload_url("too/big")
                answer = http.put(req.url, content=b"f" * (6 * 1024 * 1024), headers=req.headers)
                assert answer.status_code == 507 and answer.json()["error"] == "storage_full"
                assert not store.exists("too/big") and leftovers(store) == []
                req = store.upload_url("fits")  # the same connection, and the disk's space, are usable again
                assert http.put(req.url, content=b"g" * (1024 * 1024), headers=req.headers).status_code == 200
                assert store.get("fits") == b"g" * (1024 * 1024)
        finally:
            subprocess.run(["umount", "-l", str(root)], check=False)
