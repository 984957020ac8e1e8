"""Errors that name their cause: a payload that cannot be unpickled names the library whose versions differ
between the caller and the job (each envelope records the versions of the libraries its objects come from)."""

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

            yield fakecause, mod.kind.deploy(client=client, quiet=True), mod.make.deploy(client=client, quiet=True)
        finally:
            sys.path.remove(str(caller_dir))
            sys.modules.pop("fakecause", None)


def test_arguments_the_job_cannot_unpickle_name_the_library_and_both_versions(setup):
    fakecause, kind, _ = setup
    assert serialization.read_header(serialization.dump_args((fakecause.Thing(),)))["libs"] == {"fakecause": "1.0"}
    with pytest.raises(SerializationError, match=r"fakecause 1\.0 on the caller, 2\.0 in the job"):
        kind(fakecause.Thing())
    assert kind(3) == "int"


def test_a_result_the_caller_cannot_unpickle_names_them_too(setup):
    _, _, make = setup
    with pytest.raises(SerializationError, match=r"fakecause 2\.0 in the job, 1\.0 on the caller") as info:
        make()
    assert info.value.details["libraries"] == {"fakecause": "2.0"}
