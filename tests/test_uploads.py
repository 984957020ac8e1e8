"""Hostile code archives, sent through the real upload and deploy path: each one is refused with
a clear error, and nothing is written outside the version's own folder."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import zipfile
from pathlib import Path

import httpx
import pytest

GOOD = b"from opbox import operator\n\n@operator()\ndef f():\n    return 1\n"


def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return buf.getvalue()


def _link(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def _device(name: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFCHR | 0o644) << 16
    return info, b""


def _bomb() -> bytes:
    info = zipfile.ZipInfo("zeros.bin")
    info.compress_type = zipfile.ZIP_DEFLATED
    return _zip([("main.py", GOOD), (info, b"\0" * (300 * 1024 * 1024))])


CASES = {
    "zip-slip": lambda: _zip([("main.py", GOOD), ("../../escaped.py", b"x")]),
    "absolute path": lambda: _zip([("main.py", GOOD), ("/tmp/opbox-absolute.py", b"x")]),
    "symlink": lambda: _zip([("main.py", GOOD), _link("passwd", "/etc/passwd")]),
    "device file": lambda: _zip([("main.py", GOOD), _device("dev0")]),
    "duplicate names": lambda: _zip([("main.py", GOOD), ("main.py", b"evil = 1\n")]),
    "zip bomb": _bomb,
    "not a zip": lambda: b"this is plainly not a zip archive" * 10,
}


def _deploy_raw(plat, client, data: bytes) -> dict:
    sha = hashlib.sha256(data).hexdigest()
    slot = client.post("/uploads", json={"sha256": sha, "size": len(data)}).json()
    if not slot["exists"]:
        assert httpx.put(slot["upload"]["url"], content=data, timeout=120).status_code < 300
    lines = list(client.stream_lines("POST", "/jobs", json={"name": "hostile", "entry": "main:f",
                                                            "code_sha256": sha, "python": "3.11"}, timeout=300))
    return lines[-1]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_archives_are_refused_and_write_nothing(plat, client, case, tmp_path):
    with warnings_off():
        data = CASES[case]()
    before = _tree(plat.home / "code") if (plat.home / "code").exists() else set()
    last = _deploy_raw(plat, client, data)
    assert "error" in last, last
    error = last["error"]
    assert error["error"] in ("unsafe_archive", "build_failed"), error
    assert error["message"], error
    after = _tree(plat.home / "code") if (plat.home / "code").exists() else set()
    assert after == before, f"the builder left files behind: {after - before}"
    assert not Path("/tmp/opbox-absolute.py").exists()
    assert not (plat.home.parent / "escaped.py").exists() and not (plat.home / "escaped.py").exists()
    version = client.get("/job/hostile/versions").json()["versions"][0]
    assert version["status"] == "failed" and version["error"]


def test_upload_above_the_signed_size_is_refused(plat, client):
    data = os.urandom(2000)
    slot = client.post("/uploads", json={"sha256": hashlib.sha256(data).hexdigest(), "size": 1000}).json()
    resp = httpx.put(slot["upload"]["url"], content=data)
    assert resp.status_code == 413
    assert client.post("/uploads", json={"sha256": hashlib.sha256(data).hexdigest(), "size": 1000}).json()["exists"] is False


def test_tampered_upload_url_is_refused(plat, client):
    data = b"abc"
    slot = client.post("/uploads", json={"sha256": hashlib.sha256(data).hexdigest(), "size": 3}).json()
    url = slot["upload"]["url"].replace("sig=", "sig=0")
    assert httpx.put(url, content=data).status_code == 403
    other_key = slot["upload"]["url"].replace(slot["key"], slot["key"].replace("code/", "code/x"))
    assert httpx.put(other_key, content=data).status_code == 403


def test_upload_whose_content_does_not_match_its_hash_is_refused_and_never_blocks(plat, client):
    real = b"the real thing"
    claimed = hashlib.sha256(real).hexdigest()
    slot = client.post("/uploads", json={"sha256": claimed, "size": 14}).json()
    refused = httpx.put(slot["upload"]["url"], content=b"something else")
    assert refused.status_code == 400 and "nothing was stored" in refused.json()["message"]
    again = client.post("/uploads", json={"sha256": claimed, "size": 14}).json()
    assert again["exists"] is False  # the wrong bytes did not stick: the right ones can come
    assert httpx.put(again["upload"]["url"], content=real).status_code == 200
    assert client.post("/uploads", json={"sha256": claimed, "size": 14}).json()["exists"] is True


def test_wrong_bytes_a_store_kept_are_discarded_at_deploy(plat, client):
    """A store that does not check the signed digest (some S3 servers) may keep other bytes: the deploy
    refuses them and drops them, so the next upload of the real archive is not told it exists."""
    real = b"another real thing"
    claimed = hashlib.sha256(real).hexdigest()
    kept = plat.home / "store" / plat.workspace / "code" / f"{claimed}.zip"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(b"bytes a lax store kept")
    with pytest.raises(Exception, match="does not match its sha256; it was discarded"):
        list(client.stream_lines("POST", "/jobs", json={"name": "liar", "entry": "main:f", "code_sha256": claimed,
                                                        "python": "3.11"}))
    assert not kept.exists()
    assert client.post("/uploads", json={"sha256": claimed, "size": len(real)}).json()["exists"] is False


class warnings_off:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
