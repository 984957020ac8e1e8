"""A per-token request rate limit: a flood from one token gets 429 with Retry-After, quickly and cheaply,
while another token (another workspace's) is served as usual; the bucket refills."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from platform_fixture import running_platform

RATE = 20


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    with running_platform(tmp_path_factory.mktemp("home"), extra_env={"OPBOX_RATE_LIMIT": str(RATE),
                                                                         "OPBOX_RATE_BURST": str(RATE)}) as plat:
        yield plat


def test_a_flood_gets_429_with_retry_after_and_others_are_served(limited):
    plat = limited
    out = subprocess.run([sys.executable, "-m", "opbox.cli", "workspace", "create", "calm", "--home", str(plat.home),
                          "--json"], capture_output=True, text=True, check=True, env=plat.env)
    calm = json.loads(out.stdout)
    with plat.http() as flood, httpx.Client(base_url=plat.url, headers={"Authorization": f"Bearer {calm['token']}"}) \
            as other:
        answers = [flood.get(f"/{plat.workspace}/jobs") for _ in range(3 * RATE)]
        refused = [a for a in answers if a.status_code == 429]
        assert len(refused) >= RATE // 2, [a.status_code for a in answers]
        assert all(int(a.headers["retry-after"]) >= 1 for a in refused)
        assert "requests a second" in refused[0].json()["message"]
        assert other.get("/calm/jobs").status_code == 200  # another token has its own bucket
        time.sleep(1.1)
        assert flood.get(f"/{plat.workspace}/jobs").status_code == 200  # refilled
