"""The serving proxy cannot be confused: encoded CR/LF and other control characters never reach the
upstream request line, so a caller can neither smuggle a second request onto a pooled keep-alive
connection nor make later callers receive someone else's answer. Fuzzed with hypothesis against a
real replica behind a real gateway."""

from __future__ import annotations

import itertools
import string
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from opbox import serve_asgi

ECHO_APP = '''
import json

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers = dict(scope["headers"])
    body = json.dumps({"id": headers.get(b"x-req-id", b"").decode("latin-1"), "path": scope["path"],
                       "method": scope["method"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
'''

CLASS_CODE = '''
from opbox import operator

@operator()
class Echo:
    def hello(self, x=1):
        return x
'''

_ids = itertools.count()


@pytest.fixture(scope="module")
def services(plat, client, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smuggle_proj")
    (folder / "echoapp.py").write_text(ECHO_APP)
    app = serve_asgi("echoapp:app", name="echo", folder=folder, client=client, quiet=True)
    yield app
    app.delete()


@pytest.fixture(scope="module")
def http(plat):
    with plat.http() as client:
        yield client


def call(plat, http, path: str, extra_headers: dict | None = None):
    rid = f"req-{next(_ids)}"
    answer = http.get(f"{plat.url}/{plat.workspace}/serve/echo/{path}", headers={"x-req-id": rid, **(extra_headers or {})})
    return rid, answer


def assert_no_crosstalk(plat, http, rounds: int = 20):
    for _ in range(rounds):
        rid, answer = call(plat, http, "plain")
        assert answer.status_code == 200 and answer.json()["id"] == rid, answer.text


SMUGGLE = "x%20HTTP/1.1%0D%0AHost:%20a%0D%0A%0D%0AGET%20/evil%20HTTP/1.1%0D%0AX-Pad:%20"


def test_the_reported_smuggling_path_is_refused_or_harmless(plat, http, services):
    rid, answer = call(plat, http, SMUGGLE)
    assert answer.status_code == 400 and "control characters" in answer.json()["message"]
    assert_no_crosstalk(plat, http)


def test_a_class_method_path_with_crlf_is_a_400(plat, http, user_code, client):
    mod = user_code(CLASS_CODE)
    svc = mod.Echo.deploy(name="echo-class", client=client, quiet=True)
    url = f"{plat.url}/{plat.workspace}/serve/echo-class/"
    assert http.post(url + "hello%0D%0AHost:%20x", json={}).status_code == 400
    assert http.post(url + "hel%20lo", json={}).status_code == 404  # a space: no such method, and no new request
    assert http.post(url + "hello", json={"x": 3}).json() == 3
    svc.delete()


segment = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=20).filter(
    lambda s: s not in (".", ".."))  # clients normalize dot segments away before sending
header_value = st.text(alphabet=string.printable.replace("\r", "").replace("\n", "").replace("\x0b", "")
                       .replace("\x0c", ""), max_size=40).map(str.strip)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(segment, min_size=1, max_size=3), value=header_value)
def test_fuzzed_paths_and_headers_never_mix_answers(plat, http, services, parts, value):
    path = "/".join(quote(p, safe="") for p in parts)
    rid, answer = call(plat, http, path, {"x-fuzz": value})
    assert answer.status_code in (200, 400), answer.text
    if answer.status_code == 200:
        body = answer.json()
        assert body["id"] == rid  # this caller's own answer
        assert body["path"] == f"/{'/'.join(parts)}"  # the app saw the path the caller sent, decoded once
    else:
        assert any(not p.isprintable() for p in parts)
    rid, answer = call(plat, http, "after")
    assert answer.status_code == 200 and answer.json()["id"] == rid


def test_answers_still_match_after_the_fuzzing(plat, http, services):
    assert_no_crosstalk(plat, http, rounds=50)
