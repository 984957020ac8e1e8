"""The object store briefly unavailable: calls retry and then succeed, or fail with a clear error."""

from __future__ import annotations

import importlib
import sys
import threading
import time

import httpx
import pytest

from opbox.errors import StorageError
from opbox.platform.store.s3 import S3Store
from platform_fixture import running_platform
from s3server import require_weed, run_seaweedfs
from tcp_proxy import SwitchableProxy


@pytest.fixture(scope="module")
def s3():
    require_weed()
    with run_seaweedfs() as server:
        port = int(server.endpoint_url.rsplit(":", 1)[1])
        proxy = SwitchableProxy("127.0.0.1", port)
        proxy.up()
        store = S3Store("outage", endpoint_url=proxy.url, access_key=server.access_key,
                        secret_key=server.secret_key, region=server.region, path_style=True, max_attempts=10)
        store.create_bucket_if_missing()
        yield server, proxy, store
        proxy.down()


def test_a_brief_outage_is_ridden_out_by_retries(s3):
    _, proxy, store = s3
    store.put("a/key", b"value")
    proxy.down()
    result = {}

    def read():
        started = time.monotonic()
        try:
            result["value"] = store.get("a/key")
        except Exception as exc:  # reported below
            result["error"] = exc
        result["took"] = time.monotonic() - started

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(1.0)
    proxy.up()
    reader.join(60)
    assert "error" not in result, result.get("error")
    assert result["value"] == b"value" and result["took"] >= 0.9


def test_a_long_outage_is_a_clear_storage_error(s3):
    server, proxy, _ = s3
    quick = S3Store("outage", endpoint_url=proxy.url, access_key=server.access_key, secret_key=server.secret_key,
                    region=server.region, path_style=True, max_attempts=2)
    proxy.down()
    try:
        with pytest.raises(StorageError) as info:
            quick.get("a/key")
        text = str(info.value).lower()
        assert "127.0.0.1" in text or "connect" in text or "unreachable" in text or "reach" in text
    finally:
        proxy.up()


def test_platform_on_s3_answers_a_clear_502_then_recovers(s3, tmp_path):
    server, proxy, _ = s3
    env = {"OPBOX_STORE_URL": f"s3://outage/platform?endpoint={proxy.url}&path_style=1&region={server.region}",
           "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
    with running_platform(tmp_path / "home", extra_env=env) as plat:
        client = plat.client()
        proxy.down()
        try:
            resp = client.http.post(client.path("/uploads"), json={"sha256": "a" * 64, "size": 10}, timeout=120)
            assert resp.status_code == 502, resp.text
            assert resp.json()["error"] == "storage_error" and resp.json()["message"]
        finally:
            proxy.up()
        (tmp_path / "s3mod.py").write_text("from opbox import operator\n\n@operator()\ndef f(x=2):\n    return x + 1\n")
        sys.path.insert(0, str(tmp_path))
        try:
            remote = importlib.import_module("s3mod").f.deploy(client=client, quiet=True)
        finally:
            sys.modules.pop("s3mod", None)
        assert remote(41) == 42, "after the outage, deploy (presigned upload to S3) and calls work"
        assert httpx.get(plat.url + "/healthz").status_code == 200
