"""The suite's database switch: under OPBOX_TEST_DATABASE=postgres every platform a test starts keeps its records
in a PostgreSQL database of its own home (found again when it starts again there); ON_SQLITE keeps the state file."""

from __future__ import annotations

import pytest

import platform_fixture
from opbox.client import Client
from opbox.config import ClientConfig
from conftest import TEST_DATABASE
from platform_fixture import ON_SQLITE, Gateway, running_platform


@pytest.fixture
def on_postgres(pg_server, monkeypatch):
    """As under OPBOX_TEST_DATABASE=postgres, whatever this session's switch says."""
    monkeypatch.setattr(platform_fixture, "_fresh_database", pg_server.database)


@pytest.mark.postgres_pass  # the module chooses PostgreSQL for the others: this one checks the switch
def test_a_platform_keeps_its_records_where_the_session_says(plat, client):
    client.post("/tokens", json={"name": "where"})
    url = plat.env.get("OPBOX_DATABASE_URL")
    if TEST_DATABASE == "postgres":
        assert url and url.startswith("postgresql://"), url
        assert not (plat.home / "state.db").exists(), "the records are in PostgreSQL, not in the home"
    else:
        assert not url and (plat.home / "state.db").exists()
    assert ("where",) in plat.records_rows("SELECT name FROM tokens")


def test_each_home_has_a_database_of_its_own_found_again_on_a_restart(on_postgres, tmp_path):
    with running_platform(tmp_path / "a") as first:
        token = first.client().post("/tokens", json={"name": "kept"}).json()["token"]
        url = first.env["OPBOX_DATABASE_URL"]
        assert url.startswith("postgresql://") and not (first.home / "state.db").exists()
    with running_platform(tmp_path / "a") as again, running_platform(tmp_path / "b") as other:
        assert again.env["OPBOX_DATABASE_URL"] == url
        assert again.client(token=token).get("/jobs").status_code == 200  # the token made before the restart
        assert other.env["OPBOX_DATABASE_URL"] != url
        assert "kept" not in {name for (name,) in other.records_rows("SELECT name FROM tokens")}


def test_on_sqlite_keeps_the_records_in_the_state_file_whatever_the_session_says(on_postgres, tmp_path):
    with running_platform(tmp_path / "home", extra_env=ON_SQLITE) as plat:
        plat.client().post("/tokens", json={"name": "filed"})
        assert (plat.home / "state.db").exists()
        assert ("filed",) in plat.records_rows("SELECT name FROM tokens")  # read from the file


def test_a_gateway_helper_on_a_home_shares_that_homes_database(on_postgres, tmp_path):
    with running_platform(tmp_path / "home") as plat:
        env = {k: v for k, v in plat.env.items() if k != "OPBOX_DATABASE_URL"}  # the helper finds the home's own
        second = Gateway(plat.home, "second", env, plat.token)
        try:
            Client(ClientConfig(second.url, plat.token, plat.workspace)).post("/tokens", json={"name": "via-second"})
        finally:
            second.stop()
        assert ("via-second",) in plat.records_rows("SELECT name FROM tokens")


def test_records_bytes_holds_what_the_records_keep(on_postgres, tmp_path):
    """The check test_auth and test_secrets make (a value never stored in clear) can fail on either database."""
    for env in ({}, ON_SQLITE):
        with running_platform(tmp_path / f"home{len(env)}", extra_env=env) as plat:
            plat.client().post("/tokens", json={"name": "marker-name-4f1d"})
            assert b"marker-name-4f1d" in plat.records_bytes()
