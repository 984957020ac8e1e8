"""Names, ids and versions are checked whole: a trailing newline (which `$` in re.match lets through) is refused."""

from __future__ import annotations

import pytest

from opbox import Resource
from opbox.errors import ValidationError
from opbox.platform.ids import check_name, check_workspace


@pytest.mark.parametrize("check, good", [(check_name, "train-1"), (check_workspace, "team-a")])
def test_names_with_a_trailing_newline_are_refused(check, good):
    assert check(good) == good
    for bad in (good + "\n", good + "\r\n", "\n" + good, good + " "):
        with pytest.raises(ValidationError):
            check(bad)


def test_quantities_and_gpu_types_are_checked_whole():
    with pytest.raises(ValidationError):
        Resource(gpu="nvidia-t4\n")
    assert Resource(memory="512Mi").memory == "512Mi"


def test_api_refuses_names_with_newlines(plat):
    with plat.http() as http:
        answer = http.post(f"/{plat.workspace}/tokens", json={"name": "ok\n"})
        assert answer.status_code == 422 and "not valid" in answer.json()["message"]
        answer = http.put(f"/{plat.workspace}/services/svc%0A", json={})
        assert answer.status_code == 422 and "not valid" in answer.json()["message"]
