"""Workspace secrets, end to end: who may write and read what, encryption at rest, injection into runs (warm
workers, one-shot runs, the sandbox, service replicas), rotation, and a missing secret's clear failure."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from opbox import Resource, ValidationError, operator
from opbox.errors import Forbidden, MissingSecret
from conftest import require, user_module
from platform_fixture import running_platform

VALUE = "hf_s3cr3t-value-that-must-never-leak"
CODE = """
import os
from opbox import operator

@operator(secrets=["hf"])
def read_secret():
    return {"token": os.environ.get("HF_TOKEN"), "endpoint": os.environ.get("HF_ENDPOINT")}

@operator(secrets=["hf"])
class Reader:
    def token(self):
        return os.environ.get("HF_TOKEN")
"""


def member_client(plat, client):
    made = client.post("/tokens", json={"name": "member", "role": "member"}).json()
    return plat.client(token=made["token"])


def test_admins_write_secrets_members_list_names_and_keys_and_no_route_returns_a_value(plat, client):
    client.request("PUT", "/secrets/listed", json={"values": {"API_KEY": VALUE, "REGION": "eu"}})
    member = member_client(plat, client)
    try:
        listed = member.get("/secrets").json()["secrets"]
        mine = next(s for s in listed if s["name"] == "listed")
        assert mine["keys"] == ["API_KEY", "REGION"] and VALUE not in json.dumps(listed)
        with pytest.raises(Forbidden, match="admin"):
            member.request("PUT", "/secrets/listed", json={"values": {"API_KEY": "x"}})
        with pytest.raises(Forbidden, match="admin"):
            member.request("DELETE", "/secrets/listed")
    finally:
        member.close()
    for bad in ({"OPBOX_TOKEN": "x"}, {"1BAD": "x"}, {}, {"K": 3}):
        with pytest.raises(ValidationError):
            client.request("PUT", "/secrets/bad", json={"values": bad})
    with pytest.raises(ValidationError, match="name"):
        client.request("PUT", "/secrets/Not_Lower", json={"values": {"K": "v"}})
    client.request("DELETE", "/secrets/listed")
    assert "listed" not in [s["name"] for s in client.get("/secrets").json()["secrets"]]


def test_values_are_encrypted_at_rest_under_a_key_file_apart_from_the_state(plat, client):
    client.request("PUT", "/secrets/at-rest", json={"values": {"API_KEY": VALUE}})
    key = plat.home / "secrets.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert VALUE.encode() not in plat.records_bytes()
    assert VALUE not in plat.log()


@pytest.fixture(scope="module")
def deployed(plat, client, tmp_path_factory):
    client.request("PUT", "/secrets/hf", json={"values": {"HF_TOKEN": VALUE, "HF_ENDPOINT": "https://hf.example"}})
    with user_module(tmp_path_factory.mktemp("secrets_proj"), "secretmod", CODE) as mod:
        yield mod, mod.read_secret.deploy(client=client, quiet=True)


def test_a_job_gets_its_secrets_as_environment_variables_and_its_version_names_them_only(deployed, client):
    _, fn = deployed
    assert fn() == {"token": VALUE, "endpoint": "https://hf.example"}
    versions = client.get(f"/job/{fn.job_id}/versions").json()["versions"]
    assert versions[0]["resource"]["secrets"] == ["hf"] and VALUE not in json.dumps(versions)
    assert VALUE not in client.get(f"/runs/{fn.runs()[0]['id']}").text


def test_a_changed_secret_reaches_the_next_run_and_a_deleted_one_fails_it_by_name(deployed, client):
    _, fn = deployed
    assert fn()["token"] == VALUE  # a warm worker holds the old value now
    client.request("PUT", "/secrets/hf", json={"values": {"HF_TOKEN": "rotated"}})
    assert fn() == {"token": "rotated", "endpoint": None}
    client.request("DELETE", "/secrets/hf")
    try:
        with pytest.raises(MissingSecret, match="'hf' does not exist"):
            fn()
    finally:
        client.request("PUT", "/secrets/hf", json={"values": {"HF_TOKEN": VALUE}})
    assert fn()["token"] == VALUE


def test_a_deploy_naming_a_missing_secret_fails_with_its_name(client, user_code):
    mod = user_code("""
        from opbox import operator

        @operator(secrets=["nope", "hf"])
        def needs_secret():
            return 1
    """)
    with pytest.raises(MissingSecret, match="'nope' does not exist.*opbox secrets set nope"):
        mod.needs_secret.deploy(client=client, quiet=True)
    with pytest.raises(ValidationError, match="secrets"):
        operator(secrets=["Bad Name"])


def test_a_service_replica_gets_its_secrets(deployed, client):
    mod, _ = deployed
    svc = mod.Reader.deploy(name="reader", client=client, quiet=True)
    try:
        assert svc.token() == VALUE
    finally:
        client.request("DELETE", "/services/reader")


def test_the_cli_sets_from_an_env_file_lists_and_deletes(plat, tmp_path):
    env_file = tmp_path / "prod.env"
    env_file.write_text(f"# comment\nDB_URL=postgres://db/prod\nDB_PASSWORD='{VALUE}'\n")
    env = {**os.environ, "OPBOX_URL": plat.url, "OPBOX_TOKEN": plat.token, "OPBOX_WORKSPACE": plat.workspace}

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "opbox.cli", *args], env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "DB_PASSWORD, DB_URL, EXTRA" in cli("secrets", "set", "db", "EXTRA=1", "--from-env-file", str(env_file))
    listed = cli("secrets", "list")
    assert "db" in listed and "DB_PASSWORD" in listed and VALUE not in listed
    assert json.loads(cli("secrets", "list", "--json"))[0]["keys"]
    cli("secrets", "delete", "db")
    assert "db " not in cli("secrets", "list")
    assert "secrets" in cli("--help") and "schedules" in cli("--help")


@pytest.mark.parametrize("isolation", ["worker", "run"])
def test_the_sandbox_passes_secrets_to_sealed_runs(isolation, tmp_path):
    from opbox.platform.backends.local.sandbox import find_sandbox, unsealed_reason

    require(find_sandbox(tmp_path / "probe") is not None, f"no sandbox here: {unsealed_reason()}")
    env = {"OPBOX_SANDBOX": "required", "OPBOX_ISOLATION": isolation}
    (tmp_path / "proj").mkdir()
    with running_platform(tmp_path / "home", extra_env=env) as plat, \
            user_module(tmp_path / "proj", f"sealed_secret_{isolation}", CODE) as mod:
        client = plat.client()
        client.request("PUT", "/secrets/hf", json={"values": {"HF_TOKEN": VALUE}})
        assert mod.read_secret.deploy(client=client, quiet=True)()["token"] == VALUE
        client.close()


def test_resource_keeps_secret_names_apart_from_env():
    res = Resource(env={"LOG_LEVEL": "debug"}, secrets=["hf", "openai", "hf"])
    assert res.secrets == ("hf", "openai") and res.to_dict()["secrets"] == ["hf", "openai"]
    assert Resource.from_dict(res.to_dict()) == res


def test_a_backend_that_cannot_inject_secrets_refuses_a_deploy_naming_them():
    from types import SimpleNamespace

    from opbox.errors import NotSupported
    from opbox.platform.control.deploys import Deploys

    backend = SimpleNamespace(name="kubernetes", abilities=frozenset())
    deploys = Deploys(None, None, None, SimpleNamespace(backend=backend), 1024)
    body = {"name": "job", "entry": "main:job", "code_sha256": "0" * 64, "python": "3.11",
            "resource": {"secrets": ["hf"]}}
    with pytest.raises(NotSupported, match="kubernetes backend cannot give runs workspace secrets"):
        deploys.parse_spec("default", body)
    assert deploys.parse_spec("default", {**body, "resource": {}})["resource"].secrets == ()
