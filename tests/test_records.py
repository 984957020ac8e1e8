"""The records port, method by method, over both adapters: SQLite (one state file) and PostgreSQL (a real
server, a fresh database per test). Each test asserts what the protocol in records/base.py promises."""

from __future__ import annotations

import inspect
import sqlite3
import threading

import pytest

from opbox.errors import ConfigError, Conflict
from opbox.platform.records import base
from opbox.platform.records.base import NewRun, NewVersion, RunFilter, ScheduleRecord, SecretRecord, ServiceRecord
from opbox.platform.records.base import StoredPayload
from opbox.platform.records.sqlite import open_sqlite
from opbox.platform.records.sqlite.migrations import MIGRATIONS as SQLITE_MIGRATIONS


def _open(kind: str, tmp_path, request):
    if kind == "sqlite":
        return open_sqlite(tmp_path / "state.db")
    from opbox.platform.records.postgres import open_postgres

    return open_postgres(request.getfixturevalue("pg_server").database())


@pytest.fixture(params=["sqlite", "postgres"])
def records(request, tmp_path):
    opened = _open(request.param, tmp_path, request)
    yield opened
    opened.close()


def _run(run_id: str, job="j1", ws="ws", batch=None, index=None, created=1.0, trigger="api") -> NewRun:
    return NewRun(run_id, ws, job, 1, trigger, created, 0, None, batch, index)


def _version(records, ws="ws", name="fn", kind="function", resource=None):
    return records.jobs.add_version(ws, name, kind, NewVersion("main:f", "ws/code/abc.zip", "abc", "3.11", "3.1",
                                                               resource or {"cpu": 1}, 1.0))


def test_every_method_of_the_port_is_implemented_with_its_parameters(records):
    for aggregate, protocol in base.Records.__annotations__.items():
        protocol = getattr(base, protocol)
        methods = [m for m in vars(protocol) if not m.startswith("_") and callable(getattr(protocol, m))]
        assert methods, protocol
        for method in methods:
            implemented = inspect.signature(getattr(getattr(records, aggregate), method))
            declared = inspect.signature(getattr(protocol, method))
            assert list(implemented.parameters) == list(declared.parameters)[1:], (aggregate, method)


def test_a_run_is_created_once_started_once_and_finished_with_its_result(records):
    runs = records.runs
    runs.create(_run("r-1"), b"ARGS")
    runs.create(_run("r-1"), b"OTHER")  # a resend: ignored, its bytes not counted twice
    assert runs.args("r-1") == b"ARGS" and records.usage.of("ws") == 4
    run = runs.get("r-1")
    assert (run.status, run.attempt, run.done_seq) == ("queued", 0, None)
    assert (run.worker or "/").endswith("/"), "no worker yet (PostgreSQL: the gateway whose queue holds it)"
    assert runs.get("r-missing") is None and runs.args("r-missing") is None
    assert runs.open_counts("ws") == {"queued": 1}
    assert runs.start("r-1", "w1", 2.0) is True
    assert runs.start("r-1", "w2", 3.0) is False, "a run is leased once"
    run = runs.get("r-1")
    assert (run.status, run.worker.split("/")[-1], run.started_at) == ("running", "w1", 2.0)
    ended, complete = runs.finish(run, "succeeded", 5.0, None, None, b"RESULT!")
    assert (ended.status, ended.finished_at, ended.started_at, complete) == ("succeeded", 5.0, 2.0, False)
    assert runs.result("r-1") == b"RESULT!" and records.usage.of("ws") == 11
    assert runs.open_counts("ws") == {}


def test_stored_payloads_keep_their_key_size_and_head(records):
    stored = StoredPayload("ws/payloads/k1", 5_000_000, b"OPBXhead")
    records.runs.create(_run("r-1"), stored)
    assert records.runs.args("r-1") == stored
    assert records.usage.of("ws") == 5_000_000
    assert records.runs.stored_keys(["ws/payloads/k1", "ws/payloads/gone"]) == {"ws/payloads/k1"}


def test_retries_record_attempts_and_requeue(records):
    runs = records.runs
    runs.create(_run("r-1"), b"A")
    runs.start("r-1", "w1", 2.0)
    assert runs.append_log("r-1", b"first attempt\n", 1000, b"[dropped]", False)
    runs.retry(runs.get("r-1"), "failed", "ValueError: no", "ValueError", 3.0, 10.0)
    run = runs.get("r-1")
    assert (run.status, run.attempt, run.retry_at) == ("queued", 1, 10.0) and (run.worker or "/").endswith("/")
    assert run.exit_reason == "attempt 1 failed: ValueError: no"
    (attempt,) = runs.attempts("r-1")
    assert (attempt.attempt, attempt.status, attempt.started_at, attempt.finished_at, attempt.log_seq) == \
        (0, "failed", 2.0, 3.0, 0)
    assert runs.start("r-1", "w2", 11.0) and runs.get("r-1").retry_at is None
    runs.requeue("r-1", "pod evicted")
    run = runs.get("r-1")
    assert (run.status, run.exit_reason, run.attempt) == ("queued", "pod evicted", 1)
    runs.start("r-1", "w3", 12.0)
    runs.create(_run("r-2"), b"B")
    runs.create(_run("r-3"), b"C")
    runs.finish(runs.get("r-3"), "succeeded", 13.0, None, None, b"")
    claimed = runs.claim_orphans("restart")
    if records.leadership.shared:  # its own gateway lives: nothing of its is an orphan (see the gateways' test)
        assert claimed == [] and runs.get("r-1").status == "running"
    else:  # alone on its file, at start: every open run, the running ones queued again
        assert [(r.id, r.status, r.exit_reason) for r in claimed] == [("r-1", "queued", "restart"), ("r-2", "queued", None)]
        assert runs.get("r-1").status == "queued" and runs.get("r-3").status == "succeeded"


def test_logs_append_in_order_and_drop_the_oldest_past_the_limit(records):
    runs = records.runs
    assert runs.append_log("r-none", b"x", 100, b"M", False) is False
    runs.create(_run("r-1"), b"")
    for chunk in (b"a" * 40, b"b" * 40):
        assert runs.append_log("r-1", chunk, 100, b"[older output dropped]", False)
    assert [s for s, _ in runs.logs_after("r-1", -2)] == [0, 1]
    assert runs.append_log("r-1", b"c" * 40, 100, b"[older output dropped]", False)  # 120 > 100: a goes
    logs = runs.logs_after("r-1", -2)
    assert logs == [(-1, b"[older output dropped]"), (1, b"b" * 40), (2, b"c" * 40)]
    assert runs.get("r-1").log_bytes == 80 and records.usage.of("ws") == 80
    assert runs.logs_after("r-1", 1) == [(2, b"c" * 40)]


def test_listing_searching_and_counting_runs(records):
    runs = records.runs
    for i, (job, trigger) in enumerate([("j1", "api"), ("j1", "schedule"), ("j2", "api"), ("j1", "api")]):
        runs.create(_run(f"r-{i}", job=job, trigger=trigger, created=float(i)), b"")
    runs.create(_run("r-9", job="j9", ws="other"), b"")
    runs.start("r-1", "w", 1.0)
    runs.finish(runs.get("r-1"), "failed", 2.0, "boom", "ValueError", b"E")
    assert [r.id for r in runs.of_job("j1", None, None, 10)] == ["r-3", "r-1", "r-0"]
    assert [r.id for r in runs.of_job("j1", None, "r-3", 1)] == ["r-1"]
    assert [r.id for r in runs.of_job("j1", "failed", None, 10)] == ["r-1"]
    assert [r.id for r in runs.search("ws", RunFilter(), 10)] == ["r-3", "r-2", "r-1", "r-0"]
    assert [r.id for r in runs.search("ws", RunFilter(job_id="j1", trigger="api"), 10)] == ["r-3", "r-0"]
    assert [r.id for r in runs.search("ws", RunFilter(status="failed"), 10)] == ["r-1"]
    assert [r.id for r in runs.search("ws", RunFilter(since_id="r-1", before_id="r-3"), 10)] == ["r-2", "r-1"]
    assert [r.id for r in runs.search("ws", RunFilter(status="queued"), 10)] == ["r-3", "r-2", "r-0"]
    assert runs.search("ws", RunFilter(status="no such status"), 10) == []
    assert runs.open_counts("other") == {"queued": 1}
    assert runs.open_counts("ws") == {"queued": 3}


def test_a_nul_character_in_text_is_kept_or_stands_replaced_never_an_error(records):
    """A user's exception message, a build's output or a query string may hold NUL, which PostgreSQL's text
    cannot: U+FFFD stands in for it there (SQLite keeps it); a lookup by such a key finds nothing."""
    runs = records.runs
    runs.create(_run("r-1"), b"")
    runs.start("r-1", "w", 1.0)
    ended, _ = runs.finish(runs.get("r-1"), "failed", 2.0, "ValueError: a\x00b", "Value\x00Error", b"E")
    assert ended.status == "failed" and ended.exit_reason in ("ValueError: a\x00b", "ValueError: a\ufffdb")
    assert runs.get("r-1").error_type in ("Value\x00Error", "Value\ufffdError")
    assert runs.get("r-\x00") is None and runs.of_job("j1", "fail\x00ed", None, 10) == []
    assert records.jobs.get("ws", "fn\x00") is None


def test_children_of_a_run_and_its_trace_are_kept(records):
    runs = records.runs
    runs.create(NewRun("r-1", "ws", "j1", 1, "api", 1.0, 0, None, traceparent=f"00-{'a' * 32}-{'b' * 16}-01"), b"")
    runs.create(NewRun("r-2", "ws", "j2", 1, "api", 2.0, 0, None, traceparent=f"00-{'a' * 32}-{'c' * 16}-01",
                       parent_span_id="b" * 16, parent_run_id="r-1"), b"")
    records.batches.create("b1", "ws", "j2", 1, None, 3.0)
    records.batches.add_items("b1", [NewRun("r-3", "ws", "j2", 1, "map", 3.0, 0, None, "b1", 0,
                                            traceparent=f"00-{'a' * 32}-{'d' * 16}-01", parent_span_id="b" * 16,
                                            parent_run_id="r-1")], [b""])
    child = runs.get("r-2")
    assert (child.traceparent, child.parent_span_id, child.parent_run_id) == \
        (f"00-{'a' * 32}-{'c' * 16}-01", "b" * 16, "r-1")
    item = runs.get("r-3")
    assert (item.traceparent[36:52], item.parent_span_id, item.parent_run_id) == ("d" * 16, "b" * 16, "r-1")
    assert runs.get("r-1").parent_run_id is None
    assert [r.id for r in runs.search("ws", RunFilter(parent_run_id="r-1"), 10)] == ["r-3", "r-2"]
    assert [r.id for r in runs.search("ws", RunFilter(parent_run_id="r-1", job_id="j2", batch_id="b1"), 10)] == ["r-3"]
    assert runs.search("ws", RunFilter(parent_run_id="r-2"), 10) == []


def _run_at(when: float, n: int) -> str:
    return f"r-{int(when * 1000):011x}{n:010x}"


def test_hour_counts_keep_settled_hours_and_count_the_rest_live(records):
    runs, hour = records.runs, 3600
    now = 100 * hour + 1800.0
    hours = [now // hour * hour - h * hour for h in (3, 2, 1, 0)]
    ids = [_run_at(hours[0] + 10, 1), _run_at(hours[0] + 20, 2), _run_at(hours[1] + 10, 3), _run_at(hours[2] + 10, 4),
           _run_at(hours[3] + 10, 5)]
    for run_id, job in zip(ids, ("j1", "j1", "j2", "j1", "j1")):
        runs.create(NewRun(run_id, "ws", job, 1, "api", 1.0, 0, None), b"")
    runs.create(NewRun(_run_at(hours[0] + 30, 6), "other", "j9", 1, "api", 1.0, 0, None), b"")
    for run_id, status in zip(ids[:3], ("succeeded", "failed", "timed_out")):
        runs.finish(runs.get(run_id), status, 2.0, None, None, b"")
    runs.start(ids[4], "w", 2.0)
    counts = {h: sorted(rows) for h, rows in runs.hour_counts("ws", hours, now).items()}
    assert counts == {hours[0]: [("j1", "failed", 1), ("j1", "succeeded", 1)], hours[1]: [("j2", "timed_out", 1)],
                      hours[2]: [("j1", "queued", 1)], hours[3]: [("j1", "running", 1)]}
    assert runs.hour_counts("ws", [], now) == {}
    # the first two hours were settled (every run in them ended): kept, and read back as they were kept
    assert {h: sorted(rows) for h, rows in runs.hour_counts("ws", hours, now).items()} == counts
    runs.finish(runs.get(ids[3]), "cancelled", 3.0, None, None, b"")
    counts = {h: sorted(rows) for h, rows in runs.hour_counts("ws", hours, now).items()}
    assert counts[hours[2]] == [("j1", "cancelled", 1)] and counts[hours[3]] == [("j1", "running", 1)]
    # deleting runs drops their hours' kept counts: the counts follow
    assert runs.delete_finished(0.0, 10.0, 10).runs == 4
    counts = {h: sorted(rows) for h, rows in runs.hour_counts("ws", hours, now).items()}
    assert counts == {hours[0]: [], hours[1]: [], hours[2]: [], hours[3]: [("j1", "running", 1)]}


def test_uploads_are_claimed_once_and_expire_unclaimed(records):
    uploads = records.uploads
    uploads.add("ws/uploads/a", "ws", 1.0)
    uploads.add("ws/uploads/b", "ws", 2.0)
    uploads.add("ws/uploads/c", "ws", 9.0)
    assert not uploads.claim("ws/uploads/a", "other"), "another workspace's upload"
    assert uploads.claim("ws/uploads/a", "ws") and not uploads.claim("ws/uploads/a", "ws"), "claimed once"
    assert uploads.expire(5.0, 10) == ["ws/uploads/b"]
    assert not uploads.claim("ws/uploads/b", "ws") and uploads.expire(5.0, 10) == []
    assert uploads.claim("ws/uploads/c", "ws")


def test_retention_expires_payloads_then_deletes_records(records):
    runs = records.runs
    job, _ = _version(records, resource={"retention_days": 1})
    for i in range(3):
        runs.create(NewRun(f"r-{i}", "ws", job.id, 1, "api", 0.0, 0, None), b"AAAA")
        runs.start(f"r-{i}", "w", 0.0)
        runs.append_log(f"r-{i}", b"LOG", 100, b"M", False)
    runs.finish(runs.get("r-0"), "succeeded", 0.0, None, None, StoredPayload("ws/payloads/big", 100, b"H"))
    runs.finish(runs.get("r-1"), "succeeded", 0.0, None, None, b"RR")
    records.items.add("r-1", "ws", 1, StoredPayload("ws/payloads/item", 50, b"I"))
    assert records.usage.of("ws") == 3 * 4 + 3 * 3 + 100 + 2 + 50
    first = runs.expire(7.0, 86400.0 * 1.5, 1)  # the version keeps 1 day, not the default's 7
    second = runs.expire(7.0, 86400.0 * 1.5, 10)
    assert (first.runs, second.runs) == (1, 1), "the limit holds; the open run r-2 is never expired"
    assert first.bytes + second.bytes == 2 * (4 + 3) + 100 + 2 + 50
    assert sorted(first.object_keys + second.object_keys) == ["ws/payloads/big", "ws/payloads/item"]
    assert runs.get("r-0").expired_at == 86400.0 * 1.5 and runs.result("r-0") is None
    assert runs.logs_after("r-1", -2) == [] and runs.get("r-1").log_bytes == 0
    assert records.items.count("r-1") == 0
    assert records.usage.of("ws") == 4 + 3
    assert runs.expire(7.0, 86400.0 * 1.5, 10).runs == 0
    gone = runs.delete_finished(1.0, 86400.0 * 1.5, 10)
    assert (gone.runs, gone.bytes) == (2, 0)
    assert runs.get("r-0") is None and runs.get("r-2") is not None


def test_a_map_numbers_its_completions_and_says_when_it_is_complete(records):
    batches, runs = records.batches, records.runs
    batches.create("b1", "ws", "j1", 1, 2, 1.0)
    items = [_run(f"r-b1.{i}", batch="b1", index=i) for i in range(3)]
    batches.add_items("b1", items, [b"a0", StoredPayload("ws/payloads/a1", 10, b"h"), b"a2"])
    batches.add_items("b1", [], [])
    assert batches.indexes("b1", 1, 5) == {1, 2}
    assert runs.args("r-b1.1") == StoredPayload("ws/payloads/a1", 10, b"h")
    assert records.usage.of("ws") == 2 + 10 + 2
    batch = batches.get("b1")
    assert (batch.submitted, batch.total, batch.done, batch.concurrency, batch.cancelled) == (3, None, 0, 2, False)
    assert batches.get("b-missing") is None
    ended, complete = runs.finish(runs.get("r-b1.2"), "succeeded", 2.0, None, None, b"x2")
    assert (ended.done_seq, complete) == (1, False)
    batches.seal("b1", 3)
    assert sorted(batches.open_runs("b1")) == ["r-b1.0", "r-b1.1"]
    runs.finish(runs.get("r-b1.0"), "failed", 3.0, "boom", "E", b"x0")
    ended, complete = runs.finish(runs.get("r-b1.1"), "succeeded", 4.0, None, None, b"x1")
    assert (ended.done_seq, complete) == (3, True), "the last item of a sealed map completes it"
    results = batches.results_after("b1", 1, 10)
    assert [(r.run_id, r.index, r.seq, r.status, r.payload) for r in results] == \
        [("r-b1.0", 0, 2, "failed", b"x0"), ("r-b1.1", 1, 3, "succeeded", b"x1")]
    assert batches.status_counts("b1") == {"succeeded": 2, "failed": 1}
    batches.cancel("b1")
    assert batches.get("b1").cancelled is True
    batches.create("b2", "ws", "j1", 1, None, 2.0)
    assert [b.id for b in batches.in_workspace("ws", None, 10)] == ["b2", "b1"]
    assert [b.id for b in batches.in_workspace("ws", "b2", 10)] == ["b1"]


def test_a_group_of_a_maps_runs_starts_and_finishes_in_one_go(records):
    batches, runs = records.batches, records.runs
    batches.create("b1", "ws", "j1", 1, None, 1.0)
    items = [_run(f"r-b1.{i}", batch="b1", index=i) for i in range(4)]
    batches.add_items("b1", items, [b"a0", b"a1", StoredPayload("ws/payloads/a2", 10, b"h"), b"a3"])
    batches.seal("b1", 4)
    runs.start("r-b1.3", "w0", 1.5)  # another worker has this one already
    ids = [f"r-b1.{i}" for i in range(4)]
    assert runs.start_many(ids, "w1", 2.0) == [True, True, True, False]
    assert runs.args_many(ids + ["r-none"]) == {"r-b1.0": b"a0", "r-b1.1": b"a1", "r-b1.3": b"a3",
                                               "r-b1.2": StoredPayload("ws/payloads/a2", 10, b"h")}
    runs.finish(runs.get("r-b1.1"), "cancelled", 2.5, "cancelled by request", None, b"c")  # ended meanwhile
    before = records.usage.of("ws")
    out = runs.finish_many([(run_id, "b1", "ws", f"x{i}".encode()) for i, run_id in enumerate(ids)], "succeeded", 3.0)
    assert out[1] is None, "a run that had ended is left as it was"
    assert runs.get("r-b1.1").status == "cancelled" and runs.result("r-b1.1") == b"c"
    assert [(e.id, e.done_seq, complete) for e, complete in (out[0], out[2], out[3])] == \
        [("r-b1.0", 2, False), ("r-b1.2", 3, False), ("r-b1.3", 4, True)]
    for ended, _ in (out[0], out[2], out[3]):
        assert ended == runs.get(ended.id), "each as the records now hold it"
        assert (ended.status, ended.finished_at) == ("succeeded", 3.0)
    assert runs.get("r-b1.3").started_at == 1.5 and runs.get("r-b1.0").started_at == 2.0
    assert [runs.result(run_id) for run_id in ("r-b1.0", "r-b1.2", "r-b1.3")] == [b"x0", b"x2", b"x3"]
    assert records.usage.of("ws") == before + 6 and batches.get("b1").done == 4



def test_finish_many_of_runs_outside_maps_and_of_runs_all_ended_meanwhile(records):
    runs = records.runs
    runs.create(_run("r-solo"), b"args")
    runs.create(_run("r-gone"), b"args")
    runs.finish(runs.get("r-gone"), "cancelled", 2.0, "cancelled by request", None, b"c")
    assert runs.finish_many([("r-gone", None, "ws", b"late")], "succeeded", 3.0) == [None]
    assert runs.get("r-gone").status == "cancelled" and runs.result("r-gone") == b"c"
    (ended, complete), gone = runs.finish_many([("r-solo", None, "ws", b"x"), ("r-gone", None, "ws", b"y")],
                                               "succeeded", 3.0)
    assert gone is None and complete is False and ended == runs.get("r-solo")
    assert (ended.status, ended.done_seq, ended.started_at, ended.finished_at) == ("succeeded", None, 3.0, 3.0)
    assert runs.result("r-solo") == b"x"

def test_jobs_versions_and_their_deletion(records):
    jobs = records.jobs
    job, number = _version(records)
    assert number == 1 and job.latest_version is None
    again, number = _version(records)
    assert (again.id, number) == (job.id, 2)
    with pytest.raises(Conflict):
        _version(records, kind="service")
    assert jobs.get("ws", job.id) == jobs.get("ws", "fn") == jobs.by_id(job.id)
    assert jobs.get("other", "fn") is None
    jobs.version_ready(job.id, 1, {"image": "x"}, "req", "built\n", 5.0)
    jobs.version_failed(job.id, 2, "bad", "log2")
    v1 = jobs.version(job.id, 1)
    assert (v1.status, v1.artifact, v1.requirements_sha256, v1.ready_at, v1.resource) == \
        ("ready", {"image": "x"}, "req", 5.0, {"cpu": 1})
    assert jobs.by_id(job.id).latest_version == 1
    assert [v.version for v in jobs.versions(job.id)] == [2, 1]
    assert (jobs.build_log(job.id, 1), jobs.build_log(job.id, 2), jobs.build_log(job.id, 9)) == ("built\n", "log2", None)
    assert jobs.code_in_use("ws/code/abc.zip") and not jobs.code_in_use("ws/code/other.zip")
    keys, artifacts = jobs.in_use()
    assert keys == {"ws/code/abc.zip"} and artifacts == [{"image": "x"}]
    _version(records)
    assert jobs.fail_unfinished_builds("interrupted") == 1
    assert jobs.version(job.id, 3).error == "interrupted"
    other, _ = _version(records, name="other")
    assert [j.name for j in jobs.in_workspace("ws")] in (["other", "fn"], ["fn", "other"])
    records.runs.create(NewRun("r-1", "ws", job.id, 1, "api", 1.0, 0, None), StoredPayload("ws/payloads/k", 7, b"h"))
    records.batches.create("b1", "ws", job.id, 1, None, 1.0)
    gone = jobs.delete(job.id)
    assert (gone.runs, gone.bytes, gone.object_keys) == (1, 7, ["ws/payloads/k"])
    assert jobs.by_id(job.id) is None and jobs.versions(job.id) == [] and records.runs.get("r-1") is None
    assert records.batches.get("b1") is None and jobs.by_id(other.id) is not None
    assert records.usage.of("ws") == 0


def test_tokens_and_workspaces(records):
    tokens = records.tokens
    tokens.add_workspace("ws")
    tokens.add_workspace("ws")
    assert tokens.workspace_exists("ws") and not tokens.workspace_exists("nope")
    tokens.add("t1", "new-ws", "ci", "hash1", "member")
    assert tokens.workspace_exists("new-ws")
    assert tokens.by_hash("hash1").name == "ci"
    assert tokens.revoke("new-ws", "t1", 9.0) and not tokens.revoke("new-ws", "t1", 9.0)
    assert tokens.by_hash("hash1") is None and tokens.by_hash("hash1", revoked_too=True).revoked_at == 9.0
    tokens.add("t2", "new-ws", "two", "hash2", "admin")
    assert [t.id for t in tokens.in_workspace("new-ws")] == ["t1", "t2"]


def test_services_usage_secrets_and_items(records):
    service = ServiceRecord("ws", "svc", "j1", 1, "class", 1, 4, 16, None, b"INIT", 1.0, 1.0)
    records.services.put(service)
    records.services.put(ServiceRecord("ws", "svc", "j1", 2, "class", 3, 4, 16, 60.0, b"INIT2", 1.0, 2.0))
    got = records.services.get("ws", "svc")
    assert (got.version, got.replicas, got.scale_to_zero, got.init) == (2, 3, 60.0, b"INIT2")
    assert [s.name for s in records.services.all()] == ["svc"] == [s.name for s in records.services.in_workspace("ws")]
    records.services.delete("ws", "svc")
    assert records.services.get("ws", "svc") is None
    records.usage.add("ws", 100)
    records.usage.add("ws", -30)
    assert records.usage.of("ws") == 70 and records.usage.of("none") == 0
    records.secrets.put(SecretRecord("ws", "db", ("USER", "PASS"), b"token1", 1.0, 1.0))
    records.secrets.put(SecretRecord("ws", "db", ("PASS",), b"token2", 5.0, 5.0))
    secret = records.secrets.get("ws", "db")
    assert (secret.keys, secret.data, secret.created_at, secret.updated_at) == (("PASS",), b"token2", 1.0, 5.0)
    assert [s.name for s in records.secrets.in_workspace("ws")] == ["db"]
    assert records.secrets.delete("ws", "db") and not records.secrets.delete("ws", "db")
    items = records.items
    assert items.add("r-1", "ws", 1, b"one") and not items.add("r-1", "ws", 1, b"again")
    assert items.add("r-1", "ws", 2, StoredPayload("ws/payloads/i2", 1000, b"h"))
    assert items.count("r-1") == 2 and items.count("r-2") == 0
    assert items.after("r-1", 0, 10) == [(1, b"one"), (2, StoredPayload("ws/payloads/i2", 1000, b"h"))]
    assert items.after("r-1", 1, 10)[0][0] == 2 and items.get("r-1", 1) == b"one" and items.get("r-1", 5) is None
    assert records.usage.of("ws") == 70 + 3 + 1000


def test_schedules(records):
    first = ScheduleRecord("s1", "ws", "j1", {"cron": "* * * * *"}, 0.0, 60.0, False, False, None, None, None, 1.0, 1.0)
    put = records.schedules.put(first)
    assert put == first
    replaced = records.schedules.put(ScheduleRecord("s2", "ws", "j1", {"every": 30}, 5.0, 35.0, False, False, None,
                                                    None, None, 5.0, 5.0))
    assert (replaced.id, replaced.created_at, replaced.spec, replaced.updated_at) == ("s1", 1.0, {"every": 30}, 5.0)
    records.schedules.put(ScheduleRecord("s3", "ws", "j2", {"every": 10}, 0.0, 10.0, False, False, None, None, None,
                                         6.0, 6.0))
    assert [s.id for s in records.schedules.active()] == ["s3", "s1"]
    seen = records.schedules.get("ws", "j1")
    fire = NewRun("r-x", "ws", "j1", 1, "schedule", 35.0, 0, None, None, None, "s1")
    assert records.schedules.fired(seen, 65.0, True, 35.0, "r-x", None, (fire, b"ARGS"))
    assert records.runs.get("r-x").schedule_id == "s1" and records.runs.args("r-x") == b"ARGS"
    # a second gateway that read the schedule before that fire fires nothing: the fire happened once
    again = NewRun("r-y", "ws", "j1", 1, "schedule", 35.5, 0, None, None, None, "s1")
    assert not records.schedules.fired(seen, 65.0, True, 35.5, "r-y", None, (again, b"ARGS"))
    assert records.runs.get("r-y") is None and records.usage.of("ws") == 4
    assert not records.schedules.fired(seen, 95.0, False, None, None, "no version")
    assert records.schedules.fired(records.schedules.get("ws", "j1"), 95.0, False, None, None, "no version")
    got = records.schedules.get("ws", "j1")
    assert (got.next_fire_at, got.pending, got.last_fire_at, got.last_run_id, got.last_error) == \
        (95.0, False, 35.0, "r-x", "no version")
    records.schedules.set_paused("s1", True, 100.0, 7.0)
    assert [s.id for s in records.schedules.active()] == ["s3"] and records.schedules.get("ws", "j1").paused
    assert [s.id for s in records.schedules.in_workspace("ws")] == ["s1", "s3"]
    assert records.schedules.delete("ws", "j1") and not records.schedules.delete("ws", "j1")
    assert records.schedules.get("ws", "j1") is None


# -- PostgreSQL: its schema twins SQLite's; what several gateways on one database need -----------

def _sqlite_schema(tmp_path) -> dict[str, list[str]]:
    open_sqlite(tmp_path / "ref.db").close()
    db = sqlite3.connect(tmp_path / "ref.db")
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        return {t: [c[1] for c in db.execute(f'PRAGMA table_info("{t}")')] for t in tables}
    finally:
        db.close()


def test_the_postgres_migrations_twin_sqlite_s(pg_server, tmp_path):
    import psycopg

    from opbox.platform.records.postgres import open_postgres
    from opbox.platform.records.postgres.migrations import MIGRATIONS

    assert len(MIGRATIONS) == len(SQLITE_MIGRATIONS), "each SQLite migration has its PostgreSQL twin"
    url = pg_server.database()
    open_postgres(url).close()
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = "
                            "current_schema() AND table_name <> 'schema_version' ORDER BY table_name, ordinal_position")
        found: dict[str, list[str]] = {}
        for table, column in rows:
            found.setdefault(table, []).append(column)
        assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == len(MIGRATIONS)
    assert found == _sqlite_schema(tmp_path)


def test_a_newer_or_foreign_postgres_database_is_refused_and_left_untouched(pg_server):
    import psycopg

    from opbox.platform.records.postgres import open_postgres
    from opbox.platform.records.postgres.migrations import MIGRATIONS

    newer = pg_server.database()
    open_postgres(newer).close()
    with psycopg.connect(newer, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (len(MIGRATIONS) + 1,))
    with pytest.raises(ConfigError, match="newer opbox"):
        open_postgres(newer)
    foreign = pg_server.database()
    with psycopg.connect(foreign, autocommit=True) as conn:
        conn.execute("CREATE TABLE invoices(id int)")
    with pytest.raises(ConfigError, match="not an opbox database"):
        open_postgres(foreign)
    with psycopg.connect(foreign) as conn:
        assert conn.execute("SELECT to_regclass('runs') IS NULL AND to_regclass('schema_version') IS NULL").fetchone()[0]
    with pytest.raises(ConfigError, match="cannot reach"):
        open_postgres(f"postgresql://nobody@/none?host={pg_server.root}&port=1")


def test_gateways_opening_one_postgres_database_at_once_migrate_it_once(pg_server):
    from opbox.platform.records.postgres import open_postgres
    from opbox.platform.records.postgres.migrations import MIGRATIONS

    url = pg_server.database()
    opened, errors = [], []

    def open_one():
        try:
            opened.append(open_postgres(url))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and [r.database.version for r in opened] == [len(MIGRATIONS)] * 4
    # and each claims a queued run at most once, whichever gateway asks first
    opened[0].runs.create(_run("r-1"), b"")
    assert sorted(r.runs.start("r-1", f"w{i}", 1.0) for i, r in enumerate(opened)) == [False, False, False, True]
    for r in opened:
        r.close()


def test_only_a_dead_gateway_s_runs_are_taken_over_and_its_builds_failed(pg_server):
    """Gateways on one database: each holds a liveness lock while it lives; the leader takes over the open runs
    of gateways that died (running ones queued again), never those of live ones, and fails their builds only
    when no other gateway lives. A run taken over is started by its new gateway only."""
    from opbox.platform.records.postgres import open_postgres

    url = pg_server.database()
    a, b = open_postgres(url), open_postgres(url)
    try:
        a.leadership.start()
        b.leadership.start()
        assert [a.leadership.held(), b.leadership.held()] == [True, False], "the first to look leads"
        for records, run_id in ((a, "r-a"), (b, "r-b")):
            records.runs.create(_run(run_id), b"")
            assert records.runs.start(run_id, "w1", 1.0)
        a.runs.create(_run("r-a-queued"), b"")
        a.batches.create("b-1", "ws", "j1", 1, None, 1.0)
        a.batches.add_items("b-1", [_run("r-a-item", batch="b-1", index=0)], [b""])
        assert not b.runs.start("r-a-queued", "w9", 1.0), "a queued run is started by the gateway whose queue holds it"
        _version(a)
        assert b.runs.claim_orphans("restart") == []
        assert a.runs.get("r-a").status == "running" and b.runs.get("r-b").status == "running"
        assert b.jobs.fail_unfinished_builds("interrupted") == 0, "gateway a may be building it"
        a.leadership.close()  # as a's process dying closes its connection: the server drops its locks
        from conftest import wait_for

        # the server ends a closed session's backend (and its locks) a moment later
        claimed = wait_for(lambda: b.runs.claim_orphans("its gateway died"), timeout=10)
        assert [(r.id, r.status, r.exit_reason) for r in claimed] == [
            ("r-a", "queued", "its gateway died"), ("r-a-item", "queued", None), ("r-a-queued", "queued", None)]
        assert b.runs.claim_orphans("again") == [], "each run is taken over once"
        assert not a.runs.start("r-a-item", "w1", 2.0), "what b took over, a no longer starts"
        assert b.runs.start("r-a-item", "w2", 2.0) and b.runs.start("r-a", "w3", 2.0)
        assert b.runs.get("r-b").status == "running"
        assert b.jobs.fail_unfinished_builds("interrupted") == 1
        wait_for(b.leadership.held, timeout=10)
    finally:
        a.close()
        b.close()


def test_gateways_of_another_database_on_the_server_do_not_keep_builds_building(pg_server):
    """Advisory locks are per database but pg_locks lists the whole server's: another opbox database's live
    gateway (another module's platform, a staging database beside production) is not one of this database's."""
    from opbox.platform.records.postgres import open_postgres

    elsewhere, here = open_postgres(pg_server.database()), open_postgres(pg_server.database())
    try:
        elsewhere.leadership.start()
        here.leadership.start()
        assert here.leadership.held(), "each database has a leader of its own"
        _version(here)
        assert here.jobs.fail_unfinished_builds("interrupted") == 1
    finally:
        elsewhere.close()
        here.close()


def test_the_database_url_and_the_shared_secret_are_checked(tmp_path, monkeypatch):
    from opbox.platform.core import _secret, open_records

    with pytest.raises(ConfigError, match="must be a postgresql:// URL"):
        open_records(tmp_path, "mysql://db/opbox")
    records = open_records(tmp_path, None)  # unset: the SQLite file in the home
    try:
        assert (tmp_path / "state.db").exists() and records.leadership.held() and records.wakeups(print) is None
    finally:
        records.close()
    shared = tmp_path / "shared-secret"
    shared.write_text("ab" * 32 + "\n")
    assert _secret(tmp_path, shared) == bytes.fromhex("ab" * 32)
    assert not (tmp_path / "secret").exists(), "a given secret is never made in the home"
    shared.write_text("not hex")
    with pytest.raises(ConfigError, match="OPBOX_SECRET_FILE"):
        _secret(tmp_path, shared)


def test_hours_counted_while_another_gateway_deletes_runs_are_kept_without_them(pg_server):
    """An overview keeping an hour's counts waits for a delete of runs in flight (a job's delete, retention, on
    another gateway), then counts what is left: counts made before the delete are never kept after it."""
    import psycopg

    from conftest import wait_for
    from opbox.platform.records.postgres import open_postgres
    from opbox.platform.records.postgres.runs import HOURS_LOCK

    url = pg_server.database()
    records = open_postgres(url)
    try:
        hour, now = 36_000, 50_000.0
        for n, job in enumerate(("j1", "j2", "j2")):
            run_id = _run_at(hour + 10 + n, n)
            records.runs.create(NewRun(run_id, "ws", job, 1, "api", 1.0, 0, None), b"")
            records.runs.finish(records.runs.get(run_id), "succeeded", 2.0, None, None, b"")
        with psycopg.connect(url) as deleter:  # another gateway's delete, under way
            deleter.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (HOURS_LOCK,))
            deleter.execute("DELETE FROM runs WHERE job_id = 'j2'")
            answer: dict = {}
            reader = threading.Thread(target=lambda: answer.update(records.runs.hour_counts("ws", [hour], now)))
            reader.start()
            with psycopg.connect(url, autocommit=True) as look:
                wait_for(lambda: look.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                              "AND NOT granted").fetchone()[0] == 1, timeout=10)
            deleter.commit()
            reader.join(10)
        assert answer == {hour: [("j1", "succeeded", 1)]}
        assert records.runs.hour_counts("ws", [hour], now) == {hour: [("j1", "succeeded", 1)]}, "as kept"
    finally:
        records.close()


def test_wakeups_reach_the_other_gateways_not_the_sender(pg_server):
    import queue

    from opbox.platform.records.postgres import open_postgres

    url = pg_server.database()
    a, b = open_postgres(url), open_postgres(url)
    got_a, got_b = queue.SimpleQueue(), queue.SimpleQueue()
    try:
        publish_a = a.wakeups(got_a.put)
        publish_b = b.wakeups(got_b.put)
        publish_a("run-1")
        publish_a("batch:b-1")
        assert [got_b.get(timeout=30), got_b.get(timeout=30)] == ["run-1", "batch:b-1"]
        publish_b("logs:run-2")
        assert got_a.get(timeout=30) == "logs:run-2"
        assert got_a.empty() and got_b.empty(), "a gateway does not wake itself twice"
    finally:
        a.close()
        b.close()


def test_a_lost_database_is_a_storage_error_and_calls_work_again_once_it_is_back():
    """The server goes away (a restart, a failover): calls fail with StorageError (502) within the pool's
    patience instead of hanging the gateway, and the next calls after it is back use new connections."""
    from conftest import require
    from opbox.errors import StorageError
    from opbox.platform.records.postgres import open_postgres
    from pg_server import PostgresServer, find_bin

    require(find_bin() is not None, "PostgreSQL's server is not installed (scripts/setup-postgres.sh)")
    server = PostgresServer(find_bin()).start()
    try:
        records = open_postgres(server.database())
        records.tokens.add_workspace("ws")
        server.halt()
        with pytest.raises(StorageError, match="could not be reached"):
            records.tokens.workspace_exists("ws")
        server.start()
        from conftest import wait_for

        def answers():
            try:
                return records.tokens.workspace_exists("ws")
            except StorageError:
                return False

        assert wait_for(answers, timeout=30)
        records.close()
    finally:
        server.stop()
