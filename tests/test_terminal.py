"""Every run reaches a terminal state within its timeout and grace, whatever its code does, and the
worker that ran it lives on: an exception whose __str__ raises, a result over the platform's limit."""

from __future__ import annotations

import pytest

from opbox.errors import PayloadTooLarge
from conftest import user_module
from platform_fixture import running_platform

CODE = """
import os
from opbox import operator

class Nasty(Exception):
    def __str__(self):
        raise RuntimeError("no text for you")

@operator()
def nasty():
    raise Nasty()

@operator()
def huge(n):
    return b"x" * n

@operator()
def pid():
    return os.getpid()
"""

LIMIT = 2 * 1024 * 1024


@pytest.fixture(scope="module", params=["worker", "run"])
def fns(request, tmp_path_factory):
    env = {"OPBOX_ISOLATION": request.param, "OPBOX_MAX_PAYLOAD": str(LIMIT)}
    with running_platform(tmp_path_factory.mktemp(f"home_{request.param}"), extra_env=env) as plat:
        client = plat.client()
        with user_module(tmp_path_factory.mktemp("terminal_proj"), "terminalmod", CODE) as mod:
            fns = {n: getattr(mod, n).deploy(client=client, quiet=True) for n in ("nasty", "huge", "pid")}
            fns["mode"] = request.param
            yield fns
        client.close()


def test_an_exception_whose_str_raises_still_ends_the_run(fns):
    with pytest.raises(Exception) as failed:
        fns["nasty"]()
    assert type(failed.value).__name__ == "Nasty"  # re-raised as its own type, its message a stand-in
    assert fns["pid"]() > 0


def test_a_result_over_the_limit_fails_naming_both_sizes_and_the_worker_lives(fns):
    before = fns["pid"]()
    assert len(fns["huge"](1000)) == 1000
    with pytest.raises(PayloadTooLarge, match=rf"the result is \d+ bytes; the platform's limit is {LIMIT}"):
        fns["huge"](LIMIT + 10)
    assert fns["huge"](10) == b"x" * 10
    if fns["mode"] == "worker":  # the warm worker that refused to send the result is the one still serving
        assert fns["pid"]() == before
