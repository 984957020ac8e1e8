"""The dashboard: server-rendered pages (Jinja, ``templates/dashboard``) with htmx for the live parts.

Every page is under ``/_ui`` (workspace names cannot start with "_", so no workspace's API paths are
shadowed) and needs a session cookie (``sessions.py``); every POST needs the session's CSRF token and,
when the browser sends one, a same-origin Origin. Pages read through the same control objects as the
API (``views``, ``runs``, ``deploys``, ``services``, ``auth``) and, like the API, never unpickle:
arguments and results are shown only when their envelope's JSON header carries them.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from urllib.parse import parse_qsl

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from opbox import envelope
from opbox.errors import NotFound, OpboxError, ValidationError

from ..control.payloads import head_of
from ..control.views import STATUSES
from ..ids import check_name
from ..records.base import TERMINAL
from .http import read_body
from .routes_views import next_url, run_query
from .sessions import COOKIE, LOGIN_COOKIE, Session, Sessions

TEMPLATES = Path(__file__).resolve().parent.parent.parent / "templates" / "dashboard"
STATIC = {"htmx-2.0.11.min.js": "text/javascript", "htmx-LICENSE.txt": "text/plain", "dashboard.css": "text/css"}
FORM_LIMIT = 64 * 1024  # bytes of a POSTed form
LOG_TAIL = 64 * 1024  # bytes of a run's log a page shows (the newest)
STOP_POLLING = 286  # htmx stops polling an element answered with this status
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
}


def _when(ts: float | None) -> str:
    return "" if ts is None else datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _seconds(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None else f"{b - a:.3f} s"


env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]),
                  trim_blocks=True, lstrip_blocks=True)
env.filters.update(when=_when, json=lambda v: json.dumps(v, indent=2, default=str))
env.globals.update(seconds=_seconds, statuses=STATUSES)


class Unauthenticated(Exception):
    """No valid session: the page redirects to the login form."""


def _platform(request: Request):
    return request.app.state.platform


def _sessions(request: Request) -> Sessions:
    return request.app.state.sessions


def session(request: Request) -> tuple[Session, object]:
    """The request's session and its token (still active), or Unauthenticated."""
    found = _sessions(request).read(request.cookies.get(COOKIE))
    token = _platform(request).auth.active(found.workspace, found.token_id) if found else None
    if token is None:
        raise Unauthenticated()
    return found, token


def page(request: Request, template: str, status: int = 200, **context) -> HTMLResponse:
    start = time.perf_counter()
    sess = context.pop("session", None)
    if sess is not None:
        context.update(workspace=sess[0].workspace, role=sess[1].role, csrf=_sessions(request).csrf(sess[0].nonce))
    html = env.get_template(template).render(request=request, **context)
    took = (time.perf_counter() - request.state.started) * 1000 if hasattr(request.state, "started") else 0
    headers = {**SECURITY_HEADERS, "Server-Timing": f"app;dur={took:.1f}, render;dur={(time.perf_counter() - start) * 1000:.1f}"}
    return HTMLResponse(html, status_code=status, headers=headers)


async def _form(request: Request, sess: Session | None = None, nonce: str | None = None) -> dict:
    """A POSTed form, after the CSRF checks: same origin (when the browser says), the CSRF token."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise ValidationError("cross-origin form post refused")
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        raise ValidationError("expected a form (application/x-www-form-urlencoded)")
    form = dict(parse_qsl((await read_body(request, FORM_LIMIT)).decode("utf-8", "replace")))
    if not _sessions(request).csrf_ok(nonce or (sess.nonce if sess else ""), form.get("csrf")):
        raise ValidationError("the form's CSRF token is missing or wrong: reload the page and try again")
    return form


def guarded(handler):
    """A dashboard page: times itself; no session → the login page; an error → an error page."""
    async def endpoint(request: Request):
        request.state.started = time.perf_counter()
        try:
            return await handler(request)
        except Unauthenticated:
            return RedirectResponse("/_ui/login", 303)
        except OpboxError as exc:
            return page(request, "error.html", status=exc.status, error=exc)
    endpoint.__name__ = endpoint.__qualname__ = handler.__name__
    endpoint.__doc__ = None  # not in the API reference
    return endpoint


# -- login, logout, static files ----------------------------------------------------------------------
@guarded
async def login_form(request: Request):
    nonce = request.cookies.get(LOGIN_COOKIE) or Sessions.new_nonce()
    response = page(request, "login.html", csrf=_sessions(request).csrf(nonce), error=None)
    response.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, httponly=True, samesite="strict", path="/_ui/login",
                        secure=request.url.scheme == "https")
    return response


@guarded
async def login(request: Request):
    sessions = _sessions(request)
    form = await _form(request, nonce=request.cookies.get(LOGIN_COOKIE, ""))
    token = _platform(request).auth.identify(form.get("token", ""))
    if token is None:
        return page(request, "login.html", status=401, csrf=form["csrf"], error="That token is not valid or was revoked.")
    response = RedirectResponse("/_ui/", 303)
    response.set_cookie(COOKIE, sessions.issue(token.workspace, token.id), max_age=int(sessions.ttl), httponly=True,
                        samesite="strict", path="/_ui", secure=request.url.scheme == "https")
    response.delete_cookie(LOGIN_COOKIE, path="/_ui/login")
    return response


@guarded
async def logout(request: Request):
    sess, _ = session(request)
    await _form(request, sess)
    response = RedirectResponse("/_ui/login", 303)
    response.delete_cookie(COOKIE, path="/_ui")
    return response


async def static(request: Request):
    name = request.path_params["name"]
    if name not in STATIC:
        return Response("not found", 404)
    return FileResponse(TEMPLATES / "static" / name, media_type=STATIC[name],
                        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"})


# -- pages ------------------------------------------------------------------------------------------
@guarded
async def overview(request: Request):
    sess = session(request)
    data = _platform(request).views.overview(sess[0].workspace)
    peak = max([sum(h["counts"].values()) for h in data["hours"]] + [1])
    return page(request, "overview.html", session=sess, nav="overview", data=data, peak=peak)


@guarded
async def jobs(request: Request):
    sess = session(request)
    return page(request, "jobs.html", session=sess, nav="jobs", jobs=_platform(request).deploys.jobs(sess[0].workspace))


@guarded
async def job(request: Request):
    sess = session(request)
    deploys = _platform(request).deploys
    row = deploys.job(sess[0].workspace, request.path_params["job"])
    versions = deploys.versions(row)
    chosen = request.query_params.get("version")
    version = int(chosen) if chosen and chosen.isdigit() else (versions[0].version if versions else None)
    build_log = deploys.build_log(row, version) if version is not None else ""
    return page(request, "job.html", session=sess, nav="jobs", job=row, versions=versions, version=version,
                build_log=build_log)


@guarded
async def runs(request: Request):
    sess = session(request)
    plat = _platform(request)
    query = run_query(request)
    for name in ("since", "until"):  # the form's datetime-local inputs (UTC) as well as epoch seconds
        raw = request.query_params.get(f"{name}_at")
        if raw:
            try:
                query[name] = datetime.datetime.fromisoformat(raw).replace(tzinfo=datetime.timezone.utc).timestamp()
            except ValueError:
                raise ValidationError(f"{name} must be a date and time (YYYY-MM-DDTHH:MM), got {raw!r}") from None
    result = plat.views.runs(sess[0].workspace, **query)
    names = {j.id: j.name for j in plat.deploys.jobs(sess[0].workspace)}
    return page(request, "runs.html", session=sess, nav="runs", page=result, names=names, query=query,
                params=request.query_params, next_url=next_url(request))


def _header(payload) -> dict:
    return envelope.read_header(head_of(payload)) if payload else {}


@guarded
async def run(request: Request):
    sess = session(request)
    plat = _platform(request)
    row = plat.runs.get(sess[0].workspace, request.path_params["run"])
    args = result = {}
    if row.expired_at is None:
        args = _header(plat.runs.run_args(row.id))
        result = _header(plat.runs.result(row.id)) if row.status in TERMINAL else {}
    job_row = plat.deploys.job(sess[0].workspace, row.job_id)
    text, cut = _log_tail(plat.runs, row)
    children = plat.views.runs(sess[0].workspace, parent=row.id, limit=50)  # jobs calling jobs
    names = {j.id: j.name for j in plat.deploys.jobs(sess[0].workspace)} if children.items else {}
    return page(request, "run.html", session=sess, nav="runs", run=row, job=job_row, args=args, result=result,
                terminal=row.status in TERMINAL, text=text, cut=cut, children=children, names=names)


def _log_tail(runs_, row) -> tuple[str, bool]:
    """The newest LOG_TAIL bytes of a run's log, as text, and whether older output was left out."""
    data = b"" if row.expired_at is not None else b"".join(bytes(d) for _, d in runs_.logs_after(row.id, -2))
    return data[-LOG_TAIL:].decode("utf-8", "replace"), len(data) > LOG_TAIL


@guarded
async def run_log(request: Request):
    """The log's newest bytes, as a fragment the run page polls (each second, until the run ends)."""
    sess = session(request)
    runs_ = _platform(request).runs
    row = runs_.get(sess[0].workspace, request.path_params["run"])
    text, cut = _log_tail(runs_, row)
    if row.status not in TERMINAL:
        return page(request, "run_log.html", run=row, text=text, cut=cut)
    response = page(request, "run_log.html", status=STOP_POLLING, run=row, text=text, cut=cut)
    response.headers["HX-Refresh"] = "true"  # the run ended: reload the page for its status and result
    return response


@guarded
async def cancel(request: Request):
    sess = session(request)
    await _form(request, sess[0])
    row = await _platform(request).runs.cancel(sess[0].workspace, request.path_params["run"])
    return RedirectResponse(f"/_ui/runs/{row.id}", 303)


@guarded
async def maps(request: Request):
    sess = session(request)
    plat = _platform(request)
    result = plat.views.batches(sess[0].workspace, request.query_params.get("cursor") or None)
    names = {j.id: j.name for j in plat.deploys.jobs(sess[0].workspace)}
    return page(request, "maps.html", session=sess, nav="maps", page=result, names=names, next_url=next_url(request))


@guarded
async def map_page(request: Request):
    sess = session(request)
    plat = _platform(request)
    progress = plat.views.batch(sess[0].workspace, request.path_params["batch"])
    items = plat.views.runs(sess[0].workspace, batch=progress.batch.id, limit=50)
    return page(request, "map.html", session=sess, nav="maps", progress=progress, items=items)


@guarded
async def map_progress(request: Request):
    """The progress bar and counts, as a fragment the map page polls until every item has ended."""
    sess = session(request)
    progress = _platform(request).views.batch(sess[0].workspace, request.path_params["batch"])
    total = progress.batch.total
    over = progress.batch.cancelled or (total is not None and progress.finished >= total)
    return page(request, "map_progress.html", status=STOP_POLLING if over else 200, progress=progress)


@guarded
async def services(request: Request):
    sess = session(request)
    return page(request, "services.html", session=sess, nav="services",
                services=_platform(request).services.list(sess[0].workspace))


@guarded
async def service(request: Request):
    sess = session(request)
    plat = _platform(request)
    name = request.path_params["name"]
    info = plat.services.get(sess[0].workspace, name)
    try:
        logs = await plat.services.logs(sess[0].workspace, name, LOG_TAIL)
    except OpboxError as exc:
        logs = f"(no logs: {exc.message})"
    recent = plat.views.runs(sess[0].workspace, job=info["job_id"], limit=20)
    return page(request, "service.html", session=sess, nav="services", service=info, logs=logs, recent=recent)


def _admin(request: Request):
    sess = session(request)
    if sess[1].role != "admin":
        raise NotFound("the tokens page is for the workspace's admin tokens")
    return sess


@guarded
async def tokens(request: Request):
    sess = _admin(request)
    return page(request, "tokens.html", session=sess, nav="tokens", tokens=_platform(request).auth.tokens(sess[0].workspace),
                created=None)


@guarded
async def create_token(request: Request):
    sess = _admin(request)
    form = await _form(request, sess[0])
    role = form.get("role", "member")
    if role not in ("admin", "member"):
        raise ValidationError("role must be 'admin' or 'member'")
    auth = _platform(request).auth
    name = check_name(form.get("name") or "token", "token name")
    _, value = auth.create_token(sess[0].workspace, name=name, role=role)
    return page(request, "tokens.html", session=sess, nav="tokens", tokens=auth.tokens(sess[0].workspace),
                created={"name": name, "role": role, "token": value})


@guarded
async def revoke_token(request: Request):
    sess = _admin(request)
    await _form(request, sess[0])
    _platform(request).auth.revoke(sess[0].workspace, request.path_params["token"])
    return RedirectResponse("/_ui/tokens", 303)


async def home(request: Request):
    return RedirectResponse("/_ui/", 303)


# mounted at /_ui, ahead of the API's /{workspace}/... routes (whose patterns /_ui/... would match too)
ROUTES = [
    Route("/login", login_form),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/static/{name}", static),
    Route("/", overview),
    Route("/jobs", jobs),
    Route("/jobs/{job}", job),
    Route("/runs", runs),
    Route("/runs/{run}", run),
    Route("/runs/{run}/log", run_log),
    Route("/runs/{run}/cancel", cancel, methods=["POST"]),
    Route("/maps", maps),
    Route("/maps/{batch}", map_page),
    Route("/maps/{batch}/progress", map_progress),
    Route("/services", services),
    Route("/services/{name}", service),
    Route("/tokens", tokens),
    Route("/tokens", create_token, methods=["POST"]),
    Route("/tokens/{token}/revoke", revoke_token, methods=["POST"]),
]
MOUNT = Mount("/_ui", routes=ROUTES)
