"""Retries with backoff, end to end: the waits, the filters, each attempt's record and log, a restart mid-wait."""

from __future__ import annotations


import pytest

from opbox import Resource, Retries, ValidationError
from conftest import wait_for
from platform_fixture import running_platform

CODE = """
import os
from pathlib import Path
from opbox import Retries, operator

@operator(retries=Retries(max_retries=3, backoff=2.0, initial_delay=0.1, max_delay=0.3, retry_on=(OSError,)))
def flaky(marker, succeed_on):
    attempt = len(Path(marker).read_text()) if os.path.exists(marker) else 0
    Path(marker).write_text("x" * (attempt + 1))
    print(f"attempt-{attempt} here", flush=True)
    if attempt < succeed_on:
        raise FileNotFoundError(f"not yet ({attempt})")  # an OSError: retry_on matches the exception's bases
    return attempt

@operator(retries=Retries(max_retries=3, initial_delay=0.1, retry_on=("ConnectionError",)))
def picky():
    raise ValueError("not worth another try")

@operator(retries=Retries(max_retries=2, backoff=1.0, initial_delay=0.1))
def poisoned(i):
    if i == 2:
        raise ValueError(f"poison {i}")
    return i * 10

@operator(timeout=1, retries=Retries(max_retries=1, initial_delay=0.1, retry_timeouts=True))
def sleepy(marker):
    if not os.path.exists(marker):
        Path(marker).write_text("1")
        import time
        time.sleep(60)  # the first attempt times out
    return "woke"

@operator(retries=Retries(max_retries=1, initial_delay=6.0))
def slow_retry(marker):
    if not os.path.exists(marker):
        Path(marker).write_text("1")
        raise OSError("first attempt fails")
    return "second attempt"
"""



def test_retries_checks_its_arguments():
    with pytest.raises(ValidationError, match="backoff"):
        Retries(backoff=0.5)
    with pytest.raises(ValidationError, match="max_delay"):
        Retries(initial_delay=10, max_delay=1)
    with pytest.raises(ValidationError, match="retry_on"):
        Retries(retry_on=(3,))
    with pytest.raises(ValidationError, match="disagree"):
        Resource(max_retries=2, retries=Retries(max_retries=3))
    policy = Retries(max_retries=5, backoff=2.0, initial_delay=1, max_delay=5, retry_on=(IOError, "TimeoutError"))
    assert [policy.delay(a) for a in range(5)] == [1, 2, 4, 5, 5]
    assert policy.retries("failed", ["builtins.FileNotFoundError", "builtins.OSError", "builtins.Exception"])
    assert policy.retries("failed", ["asyncio.exceptions.TimeoutError"])  # a bare name matches in any module
    assert not policy.retries("failed", ["builtins.ValueError", "builtins.Exception"])
    assert not policy.retries("timed_out", [])  # timeouts only with retry_timeouts=True
    assert Retries(retry_timeouts=True).retries("timed_out", [])
    assert Resource.from_dict(Resource(retries=policy).to_dict()).retries == policy


@pytest.fixture(scope="module")
def plat(tmp_path_factory, state_env):
    """This module runs on SQLite and on PostgreSQL (conftest.state_env)."""
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=state_env) as running:
        yield running


@pytest.fixture(scope="module")
def fns(plat, client, tmp_path_factory):
    from conftest import user_module

    with user_module(tmp_path_factory.mktemp("retries_proj"), "retrymod", CODE) as mod:
        yield {n: getattr(mod, n).deploy(client=client, quiet=True) for n in ("flaky", "picky", "poisoned", "sleepy")}


def test_a_failing_run_is_retried_with_backoff_and_each_attempt_is_listed_with_its_log(fns, client, tmp_path):
    marker = tmp_path / "marker"
    handle = fns["flaky"].submit(str(marker), 2)
    assert handle.result(timeout=60) == 2
    attempts = client.get(f"/runs/{handle.id}/attempts").json()["attempts"]
    assert [a["attempt"] for a in attempts] == [0, 1, 2]
    assert [a["status"] for a in attempts] == ["failed", "failed", "succeeded"]
    assert attempts[0]["error_type"] == "builtins.FileNotFoundError" and "not yet (0)" in attempts[0]["reason"]
    assert attempts[1]["finished_at"] >= attempts[0]["finished_at"]
    first = client.get(f"/runs/{handle.id}/logs", params={"attempt": 0}).text
    assert "attempt-0 here" in first and "attempt-1 here" not in first
    assert "attempt 1 of 4 failed" in first and "the next starts in 0.1 s" in first
    last = client.get(attempts[2]["logs"].split(f"/{client.workspace}", 1)[1]).text
    assert "attempt-2 here" in last and "attempt-1 here" not in last
    run = client.get(f"/runs/{handle.id}").json()
    assert run["attempt"] == 2 and run["status"] == "succeeded" and "retry_at" not in run


def test_an_error_retry_on_does_not_name_fails_at_once(fns, client):
    handle = fns["picky"].submit()
    with pytest.raises(ValueError, match="not worth another try"):  # the remote exception, re-raised
        handle.result(timeout=60)
    attempts = client.get(f"/runs/{handle.id}/attempts").json()["attempts"]
    assert [(a["attempt"], a["status"]) for a in attempts] == [(0, "failed")]


def test_a_timed_out_attempt_is_retried_only_when_asked(fns, client, tmp_path):
    handle = fns["sleepy"].submit(str(tmp_path / "sleepy_marker"))
    assert handle.result(timeout=60) == "woke"
    attempts = client.get(f"/runs/{handle.id}/attempts").json()["attempts"]
    assert [a["status"] for a in attempts] == ["timed_out", "succeeded"]
    assert "timed out after 1 s" in attempts[0]["reason"]


def test_a_poison_map_item_ends_failed_with_all_its_attempts_listed(fns, client):
    results = fns["poisoned"].map([1, 2, 3], return_exceptions=True)
    assert results[0] == 10 and results[2] == 30 and "poison 2" in str(results[1])
    item = next(r for r in fns["poisoned"].runs() if r.get("batch_index") == 1)
    assert item["status"] == "failed" and item["attempt"] == 2
    attempts = client.get(f"/runs/{item['id']}/attempts").json()["attempts"]
    assert [a["status"] for a in attempts] == ["failed"] * 3
    assert all("poison 2" in a["reason"] for a in attempts)


@pytest.mark.parametrize("state", ["sqlite", "postgres"])
def test_a_retry_waiting_out_its_backoff_survives_a_gateway_restart(tmp_path, state, request):
    from conftest import user_module

    env = {"OPBOX_DATABASE_URL": request.getfixturevalue("pg_server").database()} if state == "postgres" else {}
    home = tmp_path / "home"
    (tmp_path / "proj").mkdir()
    marker = tmp_path / "slow_marker"
    with running_platform(home, extra_env=env) as plat, user_module(tmp_path / "proj", "slowmod", CODE) as mod:
        client = plat.client()
        fn = mod.slow_retry.deploy(client=client, quiet=True)
        handle = fn.submit(str(marker))
        waiting = wait_for(lambda: (r := handle.status()).get("retry_at") and r)
        assert waiting["status"] == "queued" and waiting["attempt"] == 1
        plat.kill()  # SIGKILL: nothing is flushed on the way out
        client.close()
    (home / "gateway.log").rename(home / "gateway.first.log")  # the fixture reads the new address from a new log
    with running_platform(home, extra_env=env) as plat:
        client = plat.client()
        after = client.get(f"/runs/{handle.id}").json()
        assert after["attempt"] == 1 and after["status"] in ("queued", "running", "succeeded")
        result = client.get(f"/runs/{handle.id}/result", params={"wait": 60}).json()
        assert result["status"] == "succeeded" and result["result"] == "second attempt"
        attempts = client.get(f"/runs/{handle.id}/attempts").json()["attempts"]
        assert [a["status"] for a in attempts] == ["failed", "succeeded"]
        client.close()
