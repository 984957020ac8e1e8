"""Shared fixtures: a real platform on loopback per test module, and user code written to folders."""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import platform_fixture
from platform_fixture import running_platform

_counter = itertools.count()
IN_CI = os.environ.get("CI", "").lower() == "true"
# where the platforms the tests start keep their records: "sqlite" (each home's state file, the default) or
# "postgres" (a fresh database per home on the session's PostgreSQL; `make test` runs the end-to-end modules so)
TEST_DATABASE = os.environ.get("OPBOX_TEST_DATABASE") or "sqlite"


def require(condition: bool, why: str) -> None:
    """Skip locally when a component is missing; with CI=true, fail instead (nothing may skip in CI)."""
    if not condition:
        if IN_CI:
            pytest.fail(f"missing in CI: {why}")
        pytest.skip(why)


def wait_for(check, timeout: float = 60.0, every: float = 0.05):
    """``check()``'s first true value, asked every ``every`` s; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


@contextmanager
def user_module(folder: Path, name: str, source: str):
    """Write ``source`` as module ``name`` in ``folder``, import it as a user's script would, clean up after."""
    (folder / f"{name}.py").write_text(source)
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(name, None)


def pytest_configure(config):
    config.addinivalue_line("markers", "sqlite_only: keeps its platforms on SQLite whatever OPBOX_TEST_DATABASE says "
                                       "(the test is about the SQLite state file itself)")
    config.addinivalue_line("markers", "both_databases: runs on SQLite and on PostgreSQL by its own parameters "
                                       "(implied by the state_env and pg_server fixtures)")
    config.addinivalue_line("markers", "image_builds: builds container images (podman, kaniko, BuildKit): minutes "
                                       "of builds whose records test_deploy's and test_projects' make too")
    config.addinivalue_line("markers", "postgres_pass: set here on the tests that start a platform and run on "
                                       "SQLite alone by default; `make test` runs them again on PostgreSQL")
    if TEST_DATABASE not in ("sqlite", "postgres"):
        raise pytest.UsageError(f"OPBOX_TEST_DATABASE must be sqlite or postgres, got {TEST_DATABASE!r}")
    if TEST_DATABASE == "postgres":  # asked for by name: missing parts are an error, not a session of skips
        from pg_server import find_bin

        if importlib.util.find_spec("psycopg") is None or find_bin() is None:
            raise pytest.UsageError("OPBOX_TEST_DATABASE=postgres needs psycopg (pip install 'opbox[postgres]') and "
                                    "PostgreSQL's server (scripts/setup-postgres.sh)")


_STARTERS = (platform_fixture.start, platform_fixture.running_platform, platform_fixture.Gateway)


def _starts_a_platform(item) -> bool:
    """It uses ``plat``, or its module starts platforms with platform_fixture's helpers."""
    module = getattr(item, "module", None)
    return "plat" in item.fixturenames or any(value in _STARTERS for value in vars(module or object).values())


def _own_databases(item) -> bool:
    return bool(item.get_closest_marker("both_databases") or {"state_env", "pg_server"} & set(item.fixturenames))


def pytest_collection_modifyitems(config, items):
    """Mark for `make test`'s PostgreSQL pass the modules that start platforms and leave their database to the
    switch; a module choosing its databases for some of its tests (state_env, pg_server, both_databases) chose
    for all of them; sqlite_only and image_builds ones stay out. A test marked postgres_pass by hand is in."""
    own = {getattr(item, "module", None) for item in items if _own_databases(item)}
    for item in items:
        if item.get_closest_marker("postgres_pass"):
            continue
        if item.get_closest_marker("sqlite_only") or item.get_closest_marker("image_builds") \
                or getattr(item, "module", None) in own or not _starts_a_platform(item):
            continue
        item.add_marker(pytest.mark.postgres_pass)


@pytest.fixture(scope="session", autouse=True)
def records_database(request):
    """Under OPBOX_TEST_DATABASE=postgres, every platform a test starts keeps its records on PostgreSQL."""
    if TEST_DATABASE == "postgres":
        platform_fixture.use_postgres(request.getfixturevalue("pg_server").database)
    yield TEST_DATABASE
    platform_fixture.use_postgres(None)


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL from the machine's packages (scripts/setup-postgres.sh installs it), for the session."""
    from pg_server import PostgresServer, find_bin

    try:
        import psycopg  # noqa: F401
    except ImportError:
        psycopg = None
    bin_dir = find_bin()
    require(psycopg is not None, "psycopg is not installed (pip install 'opbox[postgres]')")
    require(bin_dir is not None, "PostgreSQL's server is not installed (scripts/setup-postgres.sh)")
    server = PostgresServer(bin_dir).start()
    yield server
    server.stop()


# under OPBOX_TEST_DATABASE=postgres everything runs on PostgreSQL: the SQLite half would be a second PostgreSQL run
STATE_KINDS = ("postgres",) if TEST_DATABASE == "postgres" else ("sqlite", "postgres")


@pytest.fixture(scope="module", params=STATE_KINDS)
def state_env(request) -> dict:
    """The environment of a platform on SQLite (its home's state file) or on a fresh PostgreSQL database;
    end-to-end modules that ask for it run once on each."""
    if request.param == "sqlite":
        return dict(platform_fixture.ON_SQLITE)
    return {"OPBOX_DATABASE_URL": request.getfixturevalue("pg_server").database()}


@pytest.fixture(scope="module")
def plat(tmp_path_factory):
    with running_platform(tmp_path_factory.mktemp("home")) as running:
        yield running


@pytest.fixture(scope="module")
def client(plat):
    c = plat.client()
    yield c
    c.close()


@pytest.fixture
def user_code(tmp_path):
    """Write a user's module (dedented source) into its own folder and import it, as `python main.py` would."""
    made = []

    def make(source: str, files: dict[str, str] | None = None, stem: str | None = None):
        stem = stem or f"usermod{next(_counter)}"
        folder = tmp_path / f"proj_{stem}"
        folder.mkdir()
        (folder / f"{stem}.py").write_text(textwrap.dedent(source))
        for name, content in (files or {}).items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(content))
        sys.path.insert(0, str(folder))
        made.append((str(folder), stem))
        return importlib.import_module(stem)

    yield make
    for folder, stem in made:
        sys.modules.pop(stem, None)
        if folder in sys.path:
            sys.path.remove(folder)
