"""The ObjectStore contract, as a mixin: subclass it in a Test* class that has a ``store``
fixture yielding an empty store whose signed URLs are served (a live server)."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import httpx
import pytest

from opbox.errors import NotFound, ValidationError
from opbox.platform.store import ObjectStore, SignedRequest

BAD_KEYS = [
    "", "/abs", "a//b", "a/", "../up", "a/../b", "a/./b", ".", "..",
    "back\\slash", "nul\x00byte", "x" * 1025, "é" * 513,
]  # fmt: skip
LONG_KEY = "/".join(["k" * 99] * 10) + "/zzzzz"  # 1005 bytes: room for a short store prefix


def send(request: SignedRequest, content: bytes | None = None) -> httpx.Response:
    return httpx.request(request.method, request.url, headers=request.headers, content=content, timeout=30)


class StoreContract:
    def test_is_an_object_store(self, store):
        assert isinstance(store, ObjectStore)

    def test_put_get_overwrite(self, store):
        store.put("a/b/c.bin", b"one")
        assert store.get("a/b/c.bin") == b"one"
        store.put("a/b/c.bin", b"two!")
        assert store.get("a/b/c.bin") == b"two!"
        store.put("empty", b"")
        assert store.get("empty") == b""
        assert store.size("empty") == 0

    def test_binary_and_unicode_keys(self, store):
        data = bytes(range(256)) * 10
        key = "dir with space/ünïcødé +%&=?#.bin"
        store.put(key, data)
        assert store.get(key) == data
        assert list(store.list("dir with space/")) == [key]
        store.put(LONG_KEY, b"long")
        assert store.get(LONG_KEY) == b"long"

    def test_missing_raises_not_found(self, store, tmp_path):
        with pytest.raises(NotFound, match="nope"):
            store.get("nope")
        with pytest.raises(NotFound):
            store.open("no/such/key")
        with pytest.raises(NotFound):
            store.get_file("nope", tmp_path / "out")
        assert not (tmp_path / "out").exists()
        assert issubclass(NotFound, LookupError)

    def test_modified(self, store):
        assert store.modified("m") is None
        before = time.time()
        store.put("m", b"x")
        when = store.modified("m")
        assert when is not None and before - 5 <= when <= time.time() + 5  # server clocks may differ a little

    def test_exists_and_size(self, store):
        assert not store.exists("k")
        assert store.size("k") is None
        store.put("k", b"12345")
        assert store.exists("k")
        assert store.size("k") == 5

    def test_delete(self, store):
        store.put("x/1", b"1")
        store.delete("x/1")
        assert not store.exists("x/1")
        store.delete("x/1")  # missing: no error
        store.delete("never/was")
        assert list(store.list()) == []

    def test_delete_prefix(self, store):
        for key in ("job/1/a", "job/1/b", "job/10/a", "job/2/a", "other"):
            store.put(key, b"x")
        assert store.delete_prefix("job/1/") == 2
        assert sorted(store.list()) == ["job/10/a", "job/2/a", "other"]
        assert store.delete_prefix("job/") == 2
        assert store.delete_prefix("job/") == 0
        assert list(store.list()) == ["other"]
        with pytest.raises(ValidationError):
            store.delete_prefix("")

    def test_list_is_a_string_prefix_match(self, store):
        keys = ["a/b", "a/c/d", "a.txt", "a0", "ab/x", "b"]
        for key in reversed(keys):
            store.put(key, b"")
        assert sorted(store.list()) == sorted(keys)  # the order is the store's
        assert sorted(store.list("a/")) == ["a/b", "a/c/d"]
        assert sorted(store.list("a")) == sorted(keys[:-1])
        assert list(store.list("a/c")) == ["a/c/d"]
        assert list(store.list("zzz/")) == []

    def test_open_streams(self, store):
        data = os.urandom(300_000)
        store.put("blob", data)
        with store.open("blob") as f:
            first = f.read(1000)
            rest = f.read()
        assert first + rest == data

    def test_put_file_get_file(self, store, tmp_path):
        src = tmp_path / "src.bin"
        src.write_bytes(os.urandom(1_000_000))
        store.put_file("files/src.bin", src)
        assert store.size("files/src.bin") == 1_000_000
        dest = tmp_path / "deep" / "out.bin"
        store.get_file("files/src.bin", dest)
        assert dest.read_bytes() == src.read_bytes()
        with pytest.raises(FileNotFoundError):
            store.put_file("files/none", tmp_path / "missing")

    def test_put_stream_from_a_pipe(self, store):
        data = os.urandom(700_000)
        read_fd, write_fd = os.pipe()  # not seekable, its size unknown ahead: as kaniko's context goes up

        def write():
            with os.fdopen(write_fd, "wb") as out:
                out.write(data)

        writer = threading.Thread(target=write)
        writer.start()
        with os.fdopen(read_fd, "rb") as stream:
            store.put_stream("files/streamed.bin", stream)
        writer.join()
        assert store.get("files/streamed.bin") == data

    @pytest.mark.parametrize("key", BAD_KEYS)
    def test_bad_keys_rejected(self, store, key):
        for call in (
            lambda: store.put(key, b"x"),
            lambda: store.get(key),
            lambda: store.exists(key),
            lambda: store.delete(key),
            lambda: store.upload_url(key),
            lambda: store.download_url(key),
        ):
            with pytest.raises(ValidationError):
                call()

    def test_bad_prefixes_rejected(self, store):
        for prefix in ("/a", "a//", "../", "a/../b", "a\\b"):
            with pytest.raises(ValidationError):
                store.list(prefix)
        with pytest.raises(ValidationError):
            store.upload_url("ok", expires=0)

    def test_signed_upload_then_download(self, store):
        data, key = os.urandom(200_000), "signed/ünï cødé+%20.bin"
        up = store.upload_url(key, expires=60, max_size=len(data))
        assert up.method == "PUT"
        assert send(up, data).status_code == 200
        assert store.get(key) == data

        down = store.download_url(key, expires=60)
        assert down.method == "GET"
        answer = send(down)
        assert answer.status_code == 200
        assert hashlib.sha256(answer.content).digest() == hashlib.sha256(data).digest()

    def test_signed_upload_bound_to_a_digest(self, store):
        data = os.urandom(100_000)
        digest = hashlib.sha256(data).hexdigest()
        good = store.upload_url("bound/good", expires=60, sha256=digest)
        assert send(good, data).status_code == 200
        assert store.get("bound/good") == data
        wrong = store.upload_url("bound/wrong", expires=60, sha256=digest)
        answer = send(wrong, data[:-1] + bytes([data[-1] ^ 1]))
        assert 400 <= answer.status_code < 500, answer.text
        assert not store.exists("bound/wrong")  # nothing half-written, nothing wrong kept
        with pytest.raises(ValidationError):
            store.upload_url("bound/x", sha256="ABC")

    def test_readers_never_see_half_an_object(self, store):
        one, two = b"1" * 2_000_000, b"2" * 2_000_000
        store.put("hot", one)
        seen, stop = set(), threading.Event()

        def read():
            while not stop.is_set():
                seen.add(hashlib.sha256(store.get("hot")).hexdigest())

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for i in range(10):
                store.put("hot", two if i % 2 else one)
        finally:
            stop.set()
            reader.join()
        assert seen <= {hashlib.sha256(one).hexdigest(), hashlib.sha256(two).hexdigest()}
