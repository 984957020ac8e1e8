"""The ``opbox`` command line: run the platform, deploy, list jobs and runs, follow logs, trigger, cancel."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import sys
import time
from pathlib import Path

import click

from . import tracecontext
from .errors import OpboxError
from .platform.backends import registry  # names only: each backend is imported when chosen


def _platform(module: str):
    """``opbox.platform.<module>``, or a clear error when the platform's extra is not installed (the SDK alone
    is the base install): the commands that run the platform on this machine go through here."""
    try:
        return importlib.import_module(f"{__package__}.platform.{module}")
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "opbox":
            raise
        raise click.ClickException(
            f"this command runs the platform, whose dependencies are not installed here (no module named "
            f"{exc.name!r}): pip install 'opbox[platform]'") from None


def _client():
    from .client import default_client

    return default_client()


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    if not rows:
        click.echo("(none)")
        return
    cells = [[str(fn(r) if callable(fn) else r.get(fn, "")) for _, fn in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _) in enumerate(columns)]
    click.echo("  ".join(h.upper().ljust(w) for (h, _), w in zip(columns, widths)))
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)))


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OpboxError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="opbox")
def main():
    """opbox: self-hosted serverless functions. Settings: OPBOX_URL, OPBOX_TOKEN, OPBOX_WORKSPACE, OPBOX_HOME."""


@main.command()
@click.option("--host", default=None, help="Address to listen on [default: 127.0.0.1, or OPBOX_HOST].")
@click.option("--port", type=int, default=None, help="Port [default: 8000, or OPBOX_PORT]; 0 picks a free one.")
@click.option("--home", type=click.Path(path_type=Path), default=None, help="State folder [default: OPBOX_HOME or ~/.opbox].")
@click.option("--backend", type=click.Choice(registry.backend_names()), default=None,
              help=f"Where runs execute: {', '.join(k.runs_on for k in registry.BACKENDS.values())} "
                   "[default: local, or OPBOX_BACKEND].")
@click.option("--builder", type=click.Choice(registry.builder_names()), default=None,
              help="How versions are built: a virtualenv, a container image built here, or one built in the "
                   "cluster and pushed to OPBOX_REGISTRY [default: local; podman for the container and kubernetes "
                   "backends; or OPBOX_BUILDER].")
@click.option("--max-workers", type=int, default=None, help="Warm workers per job version at most.")
@click.option("--isolation", type=click.Choice(["worker", "run"]), default=None,
              help="worker: warm pools (fast); run: a fresh process per run [default: worker, or OPBOX_ISOLATION].")
def up(host, port, home, backend, builder, max_workers, isolation):
    """Start the platform: gateway, backend, state and object store."""
    serve = _platform("server").main  # the CLI is the one SDK module allowed to start the platform
    Settings = _platform("settings").Settings

    serve(Settings.from_env(host=host, port=port, home=home, backend=backend, builder=builder, max_workers=max_workers,
                            isolation=isolation))


@main.command()
@click.option("--home", type=click.Path(path_type=Path), default=None, help="The platform's OPBOX_HOME.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def gc(home, as_json):
    """Drop what retention says has expired and collect unused files now (on the platform's machine)."""
    collect_garbage = _platform("core").collect_garbage
    done = collect_garbage(_platform("settings").Settings.from_env(home=home))
    if as_json:
        return _print_json(done)
    click.echo(f"expired {done['runs_expired']} runs' payloads and logs ({_size(done['payload_bytes'])}), "
               f"deleted {done['runs_deleted']} old run records, {done['payload_objects_deleted']} payloads no run "
               f"refers to, {done['archives_deleted']} unused code archives "
               f"({_size(done['archive_bytes'])}) and {done['folders_deleted']} unused code folders and "
               f"environments ({_size(done['folder_bytes'])})")


def _size(count: float) -> str:
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            break
        count /= 1024
    return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"


@main.group()
def workspace():
    """Administer workspaces on this machine's platform (writes its state in OPBOX_HOME directly)."""


@workspace.command("create")
@click.argument("name")
@click.option("--home", type=click.Path(path_type=Path), default=None, help="The platform's OPBOX_HOME.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def workspace_create(name, home, as_json):
    """Create workspace NAME with an admin token (shown once)."""
    creds = _platform("core").create_workspace(home, name)
    if as_json:
        return _print_json(creds)
    click.echo(f"workspace {name} created; its admin token (shown only now):\n  export OPBOX_WORKSPACE={name}\n"
               f"  export OPBOX_TOKEN={creds['token']}")


@main.command()
@click.argument("target")
@click.option("--name", default=None, help="Job name [default: the function's name].")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The project folder to pack; the file is imported as its dotted module under it "
                   "[default: the file's folder, or for a file in a package the nearest folder up holding "
                   "pyproject.toml, setup.cfg, .git or requirements.txt].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def deploy(target, name, root, as_json):
    """Deploy FILE:FUNCTION (e.g. moonshot/main.py:foo, or myproj/jobs/train.py:train) as a new version of its job."""
    from .project import find_root, module_path_name

    path, _, attr = target.rpartition(":")
    if not path or not attr:
        raise click.UsageError("TARGET must look like path/to/file.py:function")
    file = Path(path).resolve()
    if not file.is_file():
        raise click.UsageError(f"no such file: {path}")
    if root is None and (file.parent / "__init__.py").is_file():  # a module of a package: its project
        root = find_root(file.parent)
    if root is not None:
        root = root.resolve()
        if root not in file.parents:
            raise click.UsageError(f"{path} is not inside the root {root}")
        sys.path.insert(0, str(root))
        module = importlib.import_module(module_path_name(file, root))
    else:
        sys.path.insert(0, str(file.parent))
        spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[file.stem] = module
        spec.loader.exec_module(module)
    op = getattr(module, attr, None)
    if op is None or not hasattr(op, "deploy"):
        raise click.UsageError(f"{attr} in {path} is not decorated with @operator()")
    remote = op.deploy(name=name, quiet=as_json, **({"root": root} if root is not None else {}))
    info = {"job_id": remote.job_id, "name": remote.name, "version": remote.version}
    if as_json:
        _print_json(info)
    else:
        click.echo(f"deployed {remote.name} version {remote.version} (job {remote.job_id})")


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def jobs(ctx, as_json):
    """List the workspace's jobs (or: opbox jobs delete JOB)."""
    if ctx.invoked_subcommand is not None:
        return
    rows = _client().get("/jobs").json()["jobs"]
    if as_json:
        return _print_json(rows)
    _table(rows, [("id", "id"), ("name", "name"), ("kind", "kind"), ("latest", "latest_version"),
                  ("created", lambda r: _when(r["created_at"]))])


@jobs.command("delete")
@click.argument("job")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def jobs_delete(job, yes, as_json):
    """Delete JOB with its versions, runs and their results and logs (refused while runs are open)."""
    if not yes:
        click.confirm(f"delete job {job} with all its versions and runs?", abort=True)
    answer = _client().request("DELETE", f"/job/{job}").json()
    if as_json:
        return _print_json(answer)
    click.echo(f"deleted job {answer['name']} ({answer['deleted']}): {answer['runs']} runs, {_size(answer['bytes'])}")




@main.command()
@click.argument("job", required=False)
@click.option("--status", default=None, help="Only runs in this state (queued, running, succeeded, failed, ...).")
@click.option("--trigger", default=None, help="Only runs made this way (call, trigger, map, schedule).")
@click.option("--batch", default=None, help="Only the items of this map.")
@click.option("--parent", default=None, help="Only the runs this run's code started (jobs calling jobs).")
@click.option("--since", default=None, help="Only runs made since: a duration (30m, 6h, 2d) or epoch seconds.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1), help="How many (pages past 1,000).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def runs(job, status, trigger, batch, parent, since, limit, as_json):
    """List the workspace's runs (or JOB's, by id or name), newest first."""
    params = {k: v for k, v in {"job": job, "status": status, "trigger": trigger, "batch": batch, "parent": parent,
                                "since": _since(since)}.items() if v is not None}
    client, rows, cursor = _client(), [], None
    if job is not None:
        client.get(f"/job/{job}")  # an unknown job is an error here, not an empty list
    while len(rows) < limit:
        page = client.get("/runs", params={**params, "limit": min(1000, limit - len(rows)),
                                            **({"cursor": cursor} if cursor else {})}).json()
        rows += page["runs"]
        cursor = page["next"]
        if not cursor:
            break
    if as_json:
        return _print_json(rows)

    def took(r):
        return f"{r['finished_at'] - r['started_at']:.3f}s" if r["finished_at"] and r["started_at"] else "-"

    _table(rows, [("run", "id"), ("job", "job_id"), ("version", "version"), ("status", "status"),
                  ("trigger", "trigger"), ("created", lambda r: _when(r["created_at"])), ("took", took),
                  ("reason", lambda r: (r["exit_reason"] or "")[:60])])


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _since(value: str | None) -> float | None:
    """``--since``: a duration back from now (90s, 30m, 6h, 2d) or a moment in epoch seconds."""
    if value is None:
        return None
    try:
        if value[-1:] in _UNITS:
            return time.time() - float(value[:-1]) * _UNITS[value[-1]]
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a duration (30m, 6h, 2d) nor epoch seconds",
                                 param_hint="--since") from None


@main.command()
@click.argument("run", required=False)
@click.option("-f", "--follow", is_flag=True, help="Stream the output until the run ends.")
@click.option("--service", default=None, help="Print a service's replica output instead (stdout and stderr).")
def logs(run, follow, service):
    """Print a run's output (or, with --service NAME, a service's)."""
    if service:
        click.echo(_client().get(f"/services/{service}/logs").text, nl=False)
        return
    if not run:
        raise click.UsageError("give a RUN id, or --service NAME")
    from .remote import RunHandle

    for chunk in RunHandle(run, _client()).logs(follow=follow):
        click.echo(chunk, nl=False)


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def services(ctx, as_json):
    """List the workspace's services (classes and ASGI apps served over HTTP) and their status
    (or: opbox services delete NAME)."""
    if ctx.invoked_subcommand is not None:
        return
    rows = _client().get("/services").json()["services"]
    if as_json:
        return _print_json(rows)
    _table(rows, [("name", "name"), ("kind", "kind"), ("version", "version"), ("status", "status"),
                  ("ready", lambda r: f"{r.get('ready_replicas', 0)}/{r['replicas']}"),
                  ("rollout", lambda r: (r.get("rollout") or {}).get("state", "-")), ("url", "url")])


@services.command("delete")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def services_delete(name, as_json):
    """Delete service NAME (its replicas finish the calls in flight, then stop); its job stays."""
    answer = _client().request("DELETE", f"/services/{name}").json()
    return _print_json(answer) if as_json else click.echo(f"deleted service {answer['deleted']}")


@main.command()
@click.argument("job")
@click.argument("args", nargs=-1)
@click.option("--kwargs", "kwargs_json", default=None, help='JSON object of keyword arguments, e.g. \'{"i": 3}\'.')
@click.option("--json", "as_json", is_flag=True, help="Print the whole answer as JSON (same exit code).")
def call(job, args, kwargs_json, as_json):
    """Run JOB with ARGS and print its result; exit 1 when it fails (its remote traceback on stderr).

    Each ARG is read as JSON when it parses (3, 2.5, true, "[1, 2]") and as a string otherwise."""
    body = {"args": [_json_or_text(a) for a in args]}
    if kwargs_json:
        try:
            body["kwargs"] = json.loads(kwargs_json)
        except ValueError as exc:
            raise click.UsageError(f"--kwargs must be JSON: {exc}") from None
    client = _client()
    answer = client.post(f"/job/{job}/trigger", json=body, headers=tracecontext.caller_headers()).json()
    _show_result(_wait_result(client, answer["run_id"]), as_json)


def _json_or_text(arg: str):
    try:
        return json.loads(arg)
    except ValueError:
        return arg


@main.command()
@click.argument("job")
@click.option("--args", "args_json", default=None, help='JSON array of positional arguments, e.g. "[3]".')
@click.option("--kwargs", "kwargs_json", default=None, help='JSON object of keyword arguments, e.g. \'{"i": 3}\'.')
@click.option("--wait", is_flag=True, help="Wait for the run to end and print its result (exit 1 if it failed).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def trigger(job, args_json, kwargs_json, wait, as_json):
    """Start a run of JOB's latest version (without arguments: the function's defaults)."""
    body = {}
    try:
        if args_json:
            body["args"] = json.loads(args_json)
        if kwargs_json:
            body["kwargs"] = json.loads(kwargs_json)
    except ValueError as exc:
        raise click.UsageError(f"--args/--kwargs must be JSON: {exc}") from None
    client = _client()
    answer = client.post(f"/job/{job}/trigger", json=body, headers=tracecontext.caller_headers()).json()
    if wait:
        return _show_result(_wait_result(client, answer["run_id"]), as_json)
    if as_json:
        return _print_json(answer)
    click.echo(f"{answer['run_id']} {answer['status']} (follow it: opbox logs -f {answer['run_id']})")


@main.command()
@click.argument("run")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def result(run, as_json):
    """Wait for RUN to end and print its result; exit 1 when it failed (its remote traceback on stderr)."""
    _show_result(_wait_result(_client(), run), as_json)


def _wait_result(client, run_id: str) -> dict:
    while True:
        resp = client.get(f"/runs/{run_id}/result", params={"wait": 60})
        if resp.status_code == 200:
            return resp.json()


def _show_result(answer: dict, as_json: bool) -> None:
    """A finished run's result on stdout; a failure's type, message and remote traceback on stderr, exit 1."""
    failed = answer["status"] != "succeeded"
    if as_json:
        _print_json(answer)
    elif not failed:
        click.echo(json.dumps(answer["result"]) if answer.get("result_is_json") else answer.get("note", ""))
    else:
        error = answer.get("error") or {}
        click.echo(f"run {answer['run_id']} {answer['status']}: {error.get('type') or ''}: "
                   f"{error.get('message') or answer.get('exit_reason') or ''}", err=True)
        if error.get("traceback"):
            click.echo("Remote traceback:\n" + error["traceback"].rstrip(), err=True)
    if failed:
        sys.exit(1)


@main.command()
@click.argument("run", required=False)
@click.option("--batch", default=None, help="Cancel a map's remaining runs instead (the batch id a map prints).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cancel(run, batch, as_json):
    """Cancel a run, or with --batch the queued and running runs of a map."""
    if bool(run) == bool(batch):
        raise click.UsageError("give a run id or --batch BATCH_ID")
    if batch:
        answer = _client().post(f"/batches/{batch}/cancel").json()
        return _print_json(answer) if as_json else _echo_batch(answer)
    answer = _client().post(f"/runs/{run}/cancel").json()
    if as_json:
        return _print_json(answer)
    click.echo(f"{answer['id']} {answer['status']}")


def _echo_batch(batch: dict) -> None:
    total = "?" if batch.get("total") is None else batch["total"]
    state = "cancelled" if batch.get("cancelled") else ("done" if batch.get("done") == batch.get("total") else "running")
    click.echo(f"{batch['id']} {state}: {batch['done']} of {total} done, {batch['submitted']} submitted")


@main.command()
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def batch(batch_id, as_json):
    """Show a map's progress (its batch id is printed when a map is interrupted)."""
    answer = _client().get(f"/batches/{batch_id}").json()
    return _print_json(answer) if as_json else _echo_batch(answer)


@main.command()
@click.argument("run")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(run, as_json):
    """Show one run."""
    answer = _client().get(f"/runs/{run}").json()
    if as_json:
        return _print_json(answer)
    for key in ("id", "job_id", "version", "status", "trigger", "attempt", "exit_reason"):
        click.echo(f"{key:12} {answer.get(key)}")
    for key in ("created_at", "started_at", "finished_at"):
        click.echo(f"{key:12} {_when(answer.get(key))}")


@main.group()
def tokens():
    """Manage the workspace's tokens (needs an admin token)."""


@tokens.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def tokens_list(as_json):
    """List tokens (their values are never shown again)."""
    rows = _client().get("/tokens").json()["tokens"]
    if as_json:
        return _print_json(rows)
    _table(rows, [("id", "id"), ("name", "name"), ("role", "role"), ("created", lambda r: _when(r["created_at"])),
                  ("revoked", lambda r: _when(r["revoked_at"]))])


@tokens.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["member", "admin"]), default="member", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def tokens_create(name, role, as_json):
    """Create a token; its value is printed once."""
    made = _client().post("/tokens", json={"name": name, "role": role}).json()
    if as_json:
        return _print_json(made)
    click.echo(f"token {made['id']} ({role}); its value, shown only now:\n  {made['token']}")


@tokens.command("revoke")
@click.argument("token_id")
def tokens_revoke(token_id):
    """Revoke a token by id."""
    _client().request("DELETE", f"/tokens/{token_id}")
    click.echo(f"revoked {token_id}")


@main.group()
def schedules():
    """Run jobs on a cron expression or every period: list, set, pause, resume, delete."""


@schedules.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def schedules_list(as_json):
    """List the workspace's schedules and their next fire times."""
    rows = _client().get("/schedules").json()["schedules"]
    if as_json:
        return _print_json(rows)

    def when(r):
        spec = r["schedule"]
        return f"{spec['cron']} {spec.get('timezone', 'UTC')}" if "cron" in spec else f"every {spec['every']:g}s"

    _table(rows, [("id", "id"), ("job", "job"), ("schedule", when), ("paused", "paused"),
                  ("next", lambda r: _when(r["next_fire_at"])), ("last run", lambda r: r["last_run_id"] or "-"),
                  ("error", lambda r: (r["last_error"] or "")[:50])])


@schedules.command("set")
@click.argument("job")
@click.argument("cron", required=False)
@click.option("--every", type=float, default=None, help="A period in seconds instead of a cron expression.")
@click.option("--timezone", default="UTC", show_default=True, help="The cron expression's IANA time zone.")
@click.option("--catchup", type=click.Choice(["last", "none", "all"]), default="last", show_default=True,
              help="Fires missed while the platform was down: run once, skip them, or run each.")
@click.option("--overlap", type=click.Choice(["skip", "allow", "queue"]), default="skip", show_default=True,
              help="A fire while the previous run is still going: skip it, run anyway, or run after it.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def schedules_set(job, cron, every, timezone, catchup, overlap, as_json):
    """Set JOB's schedule to CRON (e.g. "0 2 * * *"), or --every SECONDS."""
    if bool(cron) == (every is not None):
        raise click.UsageError('give a CRON expression (quoted: "0 2 * * *") or --every SECONDS')
    body = {"cron": cron, "timezone": timezone} if cron else {"every": every}
    row = _client().request("PUT", f"/job/{job}/schedule", json={**body, "catchup": catchup, "overlap": overlap}).json()
    if as_json:
        return _print_json(row)
    click.echo(f"{row['job']}: schedule {row['id']}, next run at {_when(row['next_fire_at'])}")


def _schedule_action(job: str, action: str, as_json: bool) -> None:
    row = _client().post(f"/job/{job}/schedule/{action}").json()
    if as_json:
        return _print_json(row)
    click.echo(f"{row['job']}: schedule {row['id']} " + ("paused" if row["paused"] else
                                                          f"resumed, next run at {_when(row['next_fire_at'])}"))


@schedules.command("pause")
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def schedules_pause(job, as_json):
    """Pause JOB's schedule."""
    _schedule_action(job, "pause", as_json)


@schedules.command("resume")
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def schedules_resume(job, as_json):
    """Resume JOB's schedule (fires missed while paused are not caught up)."""
    _schedule_action(job, "resume", as_json)


@schedules.command("delete")
@click.argument("job")
def schedules_delete(job):
    """Delete JOB's schedule."""
    _client().request("DELETE", f"/job/{job}/schedule")
    click.echo(f"deleted the schedule of {job}")


@main.group()
def secrets():
    """Workspace secrets, given to runs as environment variables (admins write; values are never shown)."""


@secrets.command("set")
@click.argument("name")
@click.argument("pairs", nargs=-1)
@click.option("--from-env-file", "env_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Read KEY=VALUE lines from a .env file.")
def secrets_set(name, pairs, env_file):
    """Create or replace secret NAME from KEY=VALUE pairs and/or --from-env-file F."""
    values = {}
    if env_file:
        from dotenv import dotenv_values

        values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.UsageError(f"expected KEY=VALUE, got {key!r}" + ("=..." if sep else ""))
        values[key] = value
    if not values:
        raise click.UsageError("give KEY=VALUE pairs or --from-env-file F")
    row = _client().request("PUT", f"/secrets/{name}", json={"values": values}).json()
    click.echo(f"secret {row['name']} set: {', '.join(row['keys'])}")


@secrets.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def secrets_list(as_json):
    """List the workspace's secrets: names and keys, never values."""
    rows = _client().get("/secrets").json()["secrets"]
    if as_json:
        return _print_json(rows)
    _table(rows, [("name", "name"), ("keys", lambda r: ", ".join(r["keys"])),
                  ("updated", lambda r: _when(r["updated_at"]))])


@secrets.command("delete")
@click.argument("name")
def secrets_delete(name):
    """Delete secret NAME (runs of jobs that use it fail, naming it, until it is set again)."""
    _client().request("DELETE", f"/secrets/{name}")
    click.echo(f"deleted secret {name}")


if __name__ == "__main__":
    main()
