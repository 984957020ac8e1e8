"""The dashboard over HTTP: login, session cookie, CSRF, every page, cancel, tokens, logout."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from conftest import user_module

CODE = """
import time
from opbox import operator

@operator()
def chatty(n):
    for i in range(n):
        print(f"line {i}", flush=True)
        time.sleep(0.2)
    return {"lines": n}

@operator()
def oops():
    raise KeyError("missing thing")
"""


@pytest.fixture(scope="module")
def fns(plat, client, tmp_path_factory):
    with user_module(tmp_path_factory.mktemp("dash_proj"), "dashmod", CODE) as mod:
        chatty, oops = mod.chatty.deploy(client=client, quiet=True), mod.oops.deploy(client=client, quiet=True)
        assert chatty(1) == {"lines": 1}
        with pytest.raises(Exception):
            oops()
        assert chatty.map([0, 1], progress=False) == [{"lines": 0}, {"lines": 1}]
        yield {"chatty": chatty, "oops": oops}


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def login(plat, token: str | None = None) -> httpx.Client:
    browser = httpx.Client(base_url=plat.url, timeout=30)
    form = browser.get("/_ui/login")
    assert form.status_code == 200 and 'type="password"' in form.text
    resp = browser.post("/_ui/login", data={"token": token or plat.token, "csrf": csrf_of(form.text)})
    assert resp.status_code == 303 and resp.headers["location"] == "/_ui/"
    return browser


def test_login_sets_a_safe_session_cookie(plat):
    browser = httpx.Client(base_url=plat.url, timeout=30)
    assert browser.get("/_ui/runs").headers["location"] == "/_ui/login"  # no session: the login page
    form = browser.get("/_ui/login")
    resp = browser.post("/_ui/login", data={"token": plat.token, "csrf": csrf_of(form.text)})
    cookie = [v for k, v in resp.headers.multi_items() if k == "set-cookie" and v.startswith("opbox_session=")][0]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and "Max-Age=" in cookie
    assert plat.token not in cookie and plat.token not in resp.headers.get("location", "")
    page = browser.get("/_ui/")
    assert page.status_code == 200 and "Overview" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert re.search(r"app;dur=[\d.]+", page.headers["server-timing"])


def test_login_refuses_bad_tokens_and_missing_csrf(plat):
    browser = httpx.Client(base_url=plat.url, timeout=30)
    form = browser.get("/_ui/login")
    bad = browser.post("/_ui/login", data={"token": "obx_wrong", "csrf": csrf_of(form.text)})
    assert bad.status_code == 401 and "not valid" in bad.text and "opbox_session" not in bad.headers.get("set-cookie", "")
    no_csrf = browser.post("/_ui/login", data={"token": plat.token})
    assert no_csrf.status_code == 422 and "opbox_session" not in no_csrf.headers.get("set-cookie", "")
    forged = httpx.Client(base_url=plat.url, cookies={"opbox_session": "eyJ4Ijo.deadbeef"}, timeout=30)
    assert forged.get("/_ui/").headers["location"] == "/_ui/login"


def test_every_page_renders(plat, fns):
    browser = login(plat)
    run = fns["chatty"].runs(limit=1)[0]
    failed = fns["oops"].runs(limit=1)[0]
    batch = browser.get("/_ui/maps")
    batch_id = re.search(r'href="/_ui/maps/(b-[0-9a-f]+)"', batch.text).group(1)
    pages = {
        "/_ui/": "Busiest jobs", "/_ui/jobs": "chatty", f"/_ui/jobs/{fns['chatty'].job_id}": "Build log",
        "/_ui/runs": run["id"], "/_ui/runs?status=failed": failed["id"], f"/_ui/runs?job={fns['oops'].job_id}": failed["id"],
        f"/_ui/runs/{run['id']}": "&#34;lines&#34;: 1", f"/_ui/runs/{failed['id']}": "KeyError",
        f"/_ui/maps/{batch_id}": "2 of 2", "/_ui/services": "Services", "/_ui/tokens": "bootstrap",
    }
    for url, expected in pages.items():
        resp = browser.get(url)
        assert resp.status_code == 200, (url, resp.text[:500])
        assert expected in resp.text, url
    assert "line 0" in browser.get(f"/_ui/runs/{run['id']}/log").text
    assert browser.get("/_ui/runs/r-nope").status_code == 404
    assert browser.get("/_ui/runs?since_at=yesterday").status_code == 422
    assert run["id"] in browser.get("/_ui/runs", params={"since_at": "2000-01-01T00:00"}).text
    assert browser.get("/_ui/static/htmx-2.0.11.min.js").status_code == 200
    assert "Zero-Clause BSD" in browser.get("/_ui/static/htmx-LICENSE.txt").text
    assert browser.get("/_ui/static/..%2Fbase.html").status_code == 404


def test_cancel_needs_csrf_and_then_cancels(plat, fns):
    browser = login(plat)
    run = fns["chatty"].submit(200)
    page = browser.get(f"/_ui/runs/{run.id}")
    assert "Cancel this run" in page.text
    assert browser.post(f"/_ui/runs/{run.id}/cancel", data={}).status_code == 422
    assert browser.post(f"/_ui/runs/{run.id}/cancel", data={"csrf": csrf_of(page.text)},
                        headers={"Origin": "http://evil.example"}).status_code == 422
    assert run.status()["status"] in ("queued", "running")
    done = browser.post(f"/_ui/runs/{run.id}/cancel", data={"csrf": csrf_of(page.text)})
    assert done.status_code == 303
    assert run.status()["status"] == "cancelled"
    assert "Cancel this run" not in browser.get(f"/_ui/runs/{run.id}").text


def test_tokens_page_makes_and_revoking_ends_sessions(plat):
    admin = login(plat)
    page = admin.get("/_ui/tokens")
    made = admin.post("/_ui/tokens", data={"name": "dash-member", "role": "member", "csrf": csrf_of(page.text)})
    value = re.search(r'id="new-token" readonly value="([^"]+)"', made.text).group(1)
    member = login(plat, value)
    assert member.get("/_ui/runs").status_code == 200
    assert member.get("/_ui/tokens").status_code == 404  # admins only
    token_id = re.search(r'<td>dash-member</td><td>member</td><td><code>([^<]+)</code>', made.text).group(1)
    assert admin.post(f"/_ui/tokens/{token_id}/revoke", data={"csrf": csrf_of(made.text)}).status_code == 303
    assert member.get("/_ui/runs").headers["location"] == "/_ui/login"


def test_logout_ends_the_session(plat):
    browser = login(plat)
    page = browser.get("/_ui/")
    resp = browser.post("/_ui/logout", data={"csrf": csrf_of(page.text)})
    assert resp.status_code == 303 and 'opbox_session=""' in resp.headers["set-cookie"]
    assert browser.get("/_ui/").headers["location"] == "/_ui/login"
