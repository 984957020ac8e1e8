"""Schema migrations: the previous release's state file opens, migrates and keeps its runs;
a newer or foreign file is refused with a clear error and left exactly as it was."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from opbox.errors import ConfigError
from opbox.platform.records.sqlite import open_sqlite
from opbox.platform.records.sqlite.connection import Database
from opbox.platform.records.sqlite.migrations import MIGRATIONS
from platform_fixture import ON_SQLITE, running_platform

FIXTURES = Path(__file__).parent / "fixtures"
OLD = FIXTURES / "state-0aef0a7.db"
EXPECTED = json.loads((FIXTURES / "state-0aef0a7.json").read_text())


def _maker():
    """The fixture's generator: its token, workspace and the API questions it asked the old platform."""
    spec = importlib.util.spec_from_file_location("make_state_0aef0a7", FIXTURES / "make_state_0aef0a7.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


def opbox_up(home: Path) -> subprocess.CompletedProcess:
    env = {"OPBOX_HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "opbox.cli", "up", "--port", "0"], env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_fixture_is_an_unversioned_file_of_the_previous_release():
    assert user_version(OLD) == 0
    assert len(EXPECTED["runs"]) >= 8 and EXPECTED["services"] and len(EXPECTED["tokens"]) == 3


def test_the_previous_release_file_migrates_and_keeps_every_run(tmp_path):
    path = tmp_path / "state.db"
    shutil.copyfile(OLD, path)
    old = sqlite3.connect(OLD)
    payloads = {(r, k): bytes(d) for r, k, d in old.execute("SELECT run_id, kind, data FROM payloads")}
    old.close()
    records = open_sqlite(path)
    try:
        assert records.database.version == len(MIGRATIONS)
        for run_id, shown in EXPECTED["runs"].items():
            run = records.runs.get(run_id)
            assert run is not None and run.status == shown["status"] and run.exit_reason == shown["exit_reason"]
            assert records.runs.args(run_id) == payloads[(run_id, "args")]
            assert records.runs.result(run_id) == payloads[(run_id, "result")]
            logs = b"".join(bytes(d) for _, d in records.runs.logs_after(run_id, -2)).decode()
            assert logs == EXPECTED["logs"][run_id]
        assert records.tokens.by_hash(__import__("hashlib").sha256(_maker().TOKEN.encode()).hexdigest())
        assert [s.name for s in records.services.all()] == [s["name"] for s in EXPECTED["services"]]
    finally:
        records.close()
    assert user_version(path) == len(MIGRATIONS)


def test_the_platform_serves_the_previous_release_runs(tmp_path):
    maker = _maker()
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(OLD, home / "state.db")
    # on SQLite whatever OPBOX_TEST_DATABASE says: this is the old release's state file migrating
    env = {"OPBOX_TOKEN": maker.TOKEN, "OPBOX_WORKSPACE": maker.WORKSPACE, **ON_SQLITE}
    with running_platform(home, extra_env=env) as plat:
        answered = maker.answers(plat.url)
    assert answered == EXPECTED, "the new code answers about the old runs exactly as the old code did"
    assert user_version(home / "state.db") == len(MIGRATIONS)


def test_a_file_without_the_services_table_gains_it(tmp_path):
    """Files made by ``opbox workspace create`` before the gateway first ran had no services table."""
    path = tmp_path / "state.db"
    shutil.copyfile(OLD, path)
    db = sqlite3.connect(path)
    db.execute("DROP TABLE services")
    db.commit()
    db.close()
    records = open_sqlite(path)
    try:
        assert records.services.all() == [] and records.runs.get(next(iter(EXPECTED["runs"]))) is not None
    finally:
        records.close()


def test_a_fresh_file_gets_the_latest_version(tmp_path):
    open_sqlite(tmp_path / "state.db").close()
    assert user_version(tmp_path / "state.db") == len(MIGRATIONS)


def test_migrations_apply_in_order_each_in_one_transaction(tmp_path):
    path = tmp_path / "state.db"
    n = len(MIGRATIONS)
    extra = (*MIGRATIONS, "CREATE TABLE extra(x INTEGER);\nINSERT INTO extra VALUES (1);\n")
    Database(path, extra).close()
    assert user_version(path) == n + 1
    failing = (*extra, "CREATE TABLE more(x INTEGER);\nINSERT INTO missing VALUES (1);\n")
    with pytest.raises(ConfigError, match=f"migrating the state to version {n + 2} failed .*stays at version {n + 1}"):
        Database(path, failing)
    db = sqlite3.connect(path)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert user_version(path) == n + 1 and "extra" in tables and "more" not in tables


def test_the_previous_releases_file_gains_the_retention_column(tmp_path):
    """Migration 2 on the fixture from release 0aef0a7: its runs are kept, none marked expired."""
    import shutil

    path = tmp_path / "state.db"
    shutil.copy(OLD, path)
    records = open_sqlite(path)
    try:
        run = records.runs.get(next(iter(EXPECTED["runs"])))
        assert run is not None and run.expired_at is None
    finally:
        records.close()
    assert user_version(path) == len(MIGRATIONS) >= 2


def _snapshot(home: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in home.iterdir() if p.name.startswith("state.db")}


def test_a_newer_file_is_refused_and_left_untouched(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    path = home / "state.db"
    shutil.copyfile(OLD, path)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 7}")
    db.commit()
    db.close()
    before = _snapshot(home)
    with pytest.raises(ConfigError) as info:
        open_sqlite(path)
    message = str(info.value)
    assert str(path) in message and f"state version is {len(MIGRATIONS) + 7}" in message
    assert f"knows versions up to {len(MIGRATIONS)}" in message
    assert _snapshot(home) == before
    out = opbox_up(home)
    assert out.returncode == 1 and out.stderr.startswith("error: ") and "newer opbox" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert _snapshot(home) == before


@pytest.mark.parametrize("content", [b"this is not a database\n" * 200, b"SQLite format 3\x00" + b"\xff" * 4000])
def test_a_file_that_is_not_sqlite_is_a_clear_error(tmp_path, content):
    home = tmp_path / "home"
    home.mkdir()
    (home / "state.db").write_bytes(content)
    with pytest.raises(ConfigError, match=r"state.db is not a valid opbox state file \(.+\)"):
        open_sqlite(home / "state.db")
    out = opbox_up(home)
    assert out.returncode == 1 and "is not a valid opbox state file" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert (home / "state.db").read_bytes() == content


def test_an_unversioned_file_with_other_tables_is_refused_untouched(tmp_path):
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE runs(id TEXT, something_else TEXT)")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="is not a valid opbox state file .*tables runs are not opbox's"):
        open_sqlite(path)
    assert path.read_bytes() == before


def test_a_postgres_database_of_an_older_schema_migrates_and_keeps_its_rows(pg_server):
    """PostgreSQL's migrations twin SQLite's: a database made by an older opbox (here: every migration
    but the last) is brought up to date at start, one transaction per migration, its runs intact."""
    import psycopg

    from opbox.platform.records.base import NewRun
    from opbox.platform.records.postgres import open_postgres
    from opbox.platform.records.postgres.connection import Database
    from opbox.platform.records.postgres.migrations import MIGRATIONS as PG_MIGRATIONS

    url = pg_server.database()
    older = Database(url, PG_MIGRATIONS[:-1])
    assert older.version == len(PG_MIGRATIONS) - 1
    older.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO runs(id, workspace, job_id, version, status, trigger, created_at) "
                     "VALUES ('r-old', 'ws', 'j', 1, 'succeeded', 'api', 1.0)")
    records = open_postgres(url)
    try:
        assert records.database.version == len(PG_MIGRATIONS)
        assert records.runs.get("r-old").status == "succeeded"
        records.runs.create(NewRun("r-new", "ws", "j", 1, "api", 2.0, 0, None), b"A")
        assert {r.id for r in records.runs.of_job("j", None, None, 10)} == {"r-old", "r-new"}
    finally:
        records.close()
