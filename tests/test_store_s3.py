"""S3Store: the ObjectStore contract against moto's server and a real SeaweedFS (signatures
checked), plus presigned URLs, multipart uploads and error mapping."""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from urllib.parse import urlsplit

import pytest
from moto.server import ThreadedMotoServer
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from opbox.errors import NotFound, StorageError, ValidationError
from opbox.platform.store import open_store
from opbox.platform.store.s3 import MIN_PART_SIZE, S3Store
from s3server import S3Server, require_weed, run_seaweedfs
from servers import serve_app
from store_contract import StoreContract, send

BUCKET = "opbox-test"


def make_store(server: S3Server, prefix: str = "", **overrides) -> S3Store:
    options = dict(
        bucket=BUCKET,
        prefix=prefix,
        endpoint_url=server.endpoint_url,
        region=server.region,
        access_key=server.access_key,
        secret_key=server.secret_key,
        multipart_threshold=MIN_PART_SIZE,
        max_attempts=2,
    )
    return S3Store(**(options | overrides))


@pytest.fixture(scope="session")
def moto_server():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}", "moto-key", "moto-secret")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server():
    with run_seaweedfs(require_weed()) as server:
        yield server


@pytest.fixture(scope="module", params=["moto", "seaweedfs"])
def s3(request) -> S3Server:
    server = request.getfixturevalue(f"{request.param}_server")
    make_store(server).create_bucket_if_missing()
    return server


@pytest.fixture
def store(s3) -> S3Store:
    return make_store(s3, prefix=f"t-{uuid.uuid4().hex[:10]}/")  # a fresh, empty namespace per test


@pytest.fixture
def seaweedfs(seaweedfs_server) -> S3Server:
    """The server that checks signatures (moto does not)."""
    make_store(seaweedfs_server).create_bucket_if_missing()
    return seaweedfs_server


class TestS3Contract(StoreContract):
    def test_signed_upload_bound_to_a_digest(self, seaweedfs):
        """Against the real server only: moto ignores x-amz-checksum-sha256; SeaweedFS, like AWS, refuses a
        body whose digest differs (and the platform discards a mismatching upload where a server does not)."""
        super().test_signed_upload_bound_to_a_digest(make_store(seaweedfs, prefix=f"t-{uuid.uuid4().hex[:10]}/"))


class TestS3:
    def test_multipart_upload_of_a_large_file(self, store, tmp_path):
        src = tmp_path / "big.bin"
        src.write_bytes(os.urandom(MIN_PART_SIZE + 1024 * 1024))
        store.put_file("big.bin", src)
        head = store._client.head_object(Bucket=BUCKET, Key=store.prefix + "big.bin")
        assert head["ETag"].strip('"').endswith("-2"), "two parts: a multipart upload"
        out = tmp_path / "out.bin"
        store.get_file("big.bin", out)
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()

    def test_small_file_is_one_put(self, store, tmp_path):
        src = tmp_path / "small.bin"
        src.write_bytes(b"s" * 1000)
        store.put_file("small.bin", src)
        head = store._client.head_object(Bucket=BUCKET, Key=store.prefix + "small.bin")
        assert "-" not in head["ETag"]

    def test_presigned_put_signs_the_content_type(self, store):
        req = store.upload_url("typed.json", expires=60, content_type="application/json")
        assert req.headers == {"Content-Type": "application/json"}
        assert "X-Amz-Signature=" in req.url and "content-type" in req.url.lower()
        assert send(req, b"{}").status_code == 200
        assert store.get("typed.json") == b"{}"

    def test_public_endpoint_url(self, s3, store):
        port = urlsplit(s3.endpoint_url).port
        public = make_store(s3, prefix=store.prefix, public_endpoint_url=f"http://localhost:{port}")
        req = public.upload_url("pub.bin", expires=60)
        assert req.url.startswith(f"http://localhost:{port}/{BUCKET}/{store.prefix}pub.bin?")
        assert send(req, b"public").status_code == 200
        assert public.get("pub.bin") == b"public"
        assert send(public.download_url("pub.bin")).content == b"public"

    def test_prefix_counts_toward_the_key_limit(self, store):
        def key(length: int) -> str:  # parts of 100 characters: SeaweedFS limits a part to 255
            return "/".join(["k" * 99] * 11)[: length - 1] + "z"

        with pytest.raises(ValidationError, match="prefix"):
            store.put(key(1024 - len(store.prefix) + 1), b"")
        store.put(key(1024 - len(store.prefix)), b"fits")

    def test_create_bucket_if_missing_is_idempotent(self, s3):
        fresh = make_store(s3, bucket=f"opbox-fresh-{uuid.uuid4().hex[:8]}")
        with pytest.raises(StorageError, match="bucket does not exist"):
            fresh.put("k", b"v")
        fresh.create_bucket_if_missing()
        fresh.create_bucket_if_missing()
        fresh.put("k", b"v")
        assert fresh.get("k") == b"v"

    def test_open_store_url(self, s3, store, monkeypatch):
        url = f"s3://{BUCKET}/{store.prefix}?endpoint={s3.endpoint_url}&region={s3.region}&path_style=1"
        opened = open_store(url, access_key=s3.access_key, secret_key=s3.secret_key, secret="for-local", base_url="x")
        assert isinstance(opened, S3Store) and opened.prefix == store.prefix
        opened.put("via-url", b"1")
        assert list(store.list()) == ["via-url"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)  # the usual environment works too
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
        assert open_store(url).get("via-url") == b"1"


class TestSeaweedFSSignatures:
    def test_tampered_presigned_urls_are_refused(self, seaweedfs):
        store = make_store(seaweedfs, prefix=f"t-{uuid.uuid4().hex[:10]}/")
        store.put("mine", b"1")
        store.put("theirs", b"2")
        down = store.download_url("mine", expires=60)
        assert send(down).content == b"1"
        other = down.url.replace("/mine?", "/theirs?")
        assert send(type(down)(other, "GET", {})).status_code == 403
        up = store.upload_url("mine", expires=60)
        assert send(type(up)(up.url, "PUT", {"Content-Type": "text/plain"}), b"evil").status_code == 403
        assert store.get("mine") == b"1"

    def test_bad_secret_key_is_a_clear_storage_error(self, seaweedfs, tmp_path):
        bad = make_store(seaweedfs, secret_key="not-the-secret")
        src = tmp_path / "f"
        src.write_bytes(b"x")
        for call in (
            lambda: bad.put("k", b"v"),
            lambda: bad.get("k"),
            lambda: bad.exists("k"),
            lambda: list(bad.list()),
            lambda: bad.put_file("k", src),
        ):
            with pytest.raises(StorageError, match="secret key") as caught:
                call()
            assert not isinstance(caught.value, NotFound)


def test_unreachable_endpoint_is_a_storage_error():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = S3Store(BUCKET, endpoint_url=f"http://127.0.0.1:{port}", access_key="a", secret_key="b", max_attempts=2)
    with pytest.raises(StorageError, match=f"127.0.0.1:{port}"):
        store.put("k", b"v")
    with pytest.raises(StorageError):
        store.exists("k")


def test_transient_5xx_is_retried_then_a_storage_error():
    calls = {"n": 0, "fail": 1}

    async def flaky(request):  # answers 503 `fail` times, then serves the object
        calls["n"] += 1
        if calls["n"] <= calls["fail"]:
            return Response(b"<Error><Code>SlowDown</Code></Error>", status_code=503)
        return Response(b"payload", media_type="application/octet-stream")

    app = Starlette(routes=[Route("/{path:path}", flaky, methods=["GET"])])
    with serve_app(app) as base_url:
        store = S3Store(BUCKET, endpoint_url=base_url, access_key="a", secret_key="b", max_attempts=3)
        assert store.get("k") == b"payload"
        assert calls["n"] == 2
        calls.update(n=0, fail=99)
        with pytest.raises(StorageError, match="SlowDown"):
            store.get("k")
        assert calls["n"] == 3
