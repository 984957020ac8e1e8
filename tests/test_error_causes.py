"""Errors that name their cause: a payload that cannot be unpickled names the library whose versions differ
between the caller and the job (each envelope records the versions of the libraries its objects come from);
a JSON trigger with missing or unknown arguments is a 422 naming the signature, and no run is made."""

from __future__ import annotations

import sys

import pytest

from opbox import serialization
from opbox.errors import SerializationError
from conftest import user_module

JOB = """
import fakecause
from opbox import operator

@operator()
def kind(x):
    return type(x).__name__

@operator()
def make():
    return fakecause.Other()

@operator()
def add(a, b=0, *, scale=1):
    return (a + b) * scale

@operator()
def anything(*args, **kwargs):
    return [list(args), kwargs]

@operator()
def fails(key):
    return {}[key]
"""
JOB_LIB = '__version__ = "2.0"\n\nclass Other:\n    pass\n'  # the job's copy: Thing is gone, Other is new
CALLER_LIB = '__version__ = "1.0"\n\nclass Thing:\n    pass\n'


@pytest.fixture(scope="module")
def setup(client, tmp_path_factory):
    job_dir, caller_dir = tmp_path_factory.mktemp("cause_job"), tmp_path_factory.mktemp("cause_caller")
    (job_dir / "fakecause.py").write_text(JOB_LIB)
    (caller_dir / "fakecause.py").write_text(CALLER_LIB)
    with user_module(job_dir, "causemod", JOB) as mod:
        sys.modules.pop("fakecause", None)
        sys.path.insert(0, str(caller_dir))  # the caller has its own (older) version of the library
        try:
            import fakecause

            yield fakecause, mod.kind.deploy(client=client, quiet=True), mod.make.deploy(client=client, quiet=True), \
                mod.add.deploy(client=client, quiet=True), mod.anything.deploy(client=client, quiet=True), \
                mod.fails.deploy(client=client, quiet=True)
        finally:
            sys.path.remove(str(caller_dir))
            sys.modules.pop("fakecause", None)


def test_arguments_the_job_cannot_unpickle_name_the_library_and_both_versions(setup):
    fakecause, kind, *_ = setup
    assert serialization.read_header(serialization.dump_args((fakecause.Thing(),)))["libs"] == {"fakecause": "1.0"}
    with pytest.raises(SerializationError, match=r"fakecause 1\.0 on the caller, 2\.0 in the job"):
        kind(fakecause.Thing())
    assert kind(3) == "int"


def test_a_result_the_caller_cannot_unpickle_names_them_too(setup):
    _, _, make, *_ = setup
    with pytest.raises(SerializationError, match=r"fakecause 2\.0 in the job, 1\.0 on the caller") as info:
        make()
    assert info.value.details["libraries"] == {"fakecause": "2.0"}


@pytest.mark.parametrize("body, problem", [
    ({"args": [1], "kwargs": {"c": 2}}, "got an unexpected keyword argument 'c'"),
    ({}, "missing required argument(s) 'a'"),
    ({"args": [1, 2, 3]}, "takes 2 positional argument(s) but 3 were given"),
    ({"args": [1], "kwargs": {"a": 2}}, "got multiple values for argument 'a'"),
])
def test_a_json_trigger_that_does_not_fit_the_signature_is_a_422_naming_it(setup, plat, client, body, problem):
    add = setup[3]
    runs_before = len(add.runs(limit=1000))
    with plat.http() as http:
        answer = http.post(f"/{plat.workspace}/job/{add.job_id}/trigger", json=body)
    assert answer.status_code == 422, answer.text
    error = answer.json()
    assert error["error"] == "validation_error" and problem in error["message"]
    assert error["details"]["signature"] == "add(a, b=0, *, scale=1)" and "signature: add(a, b=0, *, scale=1)" in error["message"]
    assert len(add.runs(limit=1000)) == runs_before, "no run was made"


def test_json_triggers_that_fit_run(setup, plat):
    _, _, _, add, anything, _ = setup
    with plat.http() as http:
        ws = plat.workspace
        run = http.post(f"/{ws}/job/{add.job_id}/trigger", json={"args": [1], "kwargs": {"b": 2, "scale": 3}}).json()
        assert http.get(f"/{ws}/runs/{run['run_id']}/result", params={"wait": 60}).json()["result"] == 9
        run = http.post(f"/{ws}/job/{anything.job_id}/trigger", json={"args": [1], "kwargs": {"z": 2}}).json()
        assert http.get(f"/{ws}/runs/{run['run_id']}/result", params={"wait": 60}).json()["result"] == [[1], {"z": 2}]
        assert http.get(f"/{ws}/job/{add.job_id}/versions").json()["versions"][0]["signature"] == "add(a, b=0, *, scale=1)"


def test_a_remote_traceback_shows_the_users_frames_by_their_project_paths(setup, plat):
    fails = setup[5]
    with pytest.raises(KeyError) as info:
        fails("missing")
    text = info.value.remote_traceback
    assert 'File "causemod.py", line' in text and "return {}[key]" in text
    assert str(plat.home) not in text and "opbox/runtime" not in text, "no server paths, no runtime frames"
