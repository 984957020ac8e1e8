"""Resource: Kubernetes quantities, validated at decoration time."""

from __future__ import annotations

from decimal import Decimal

import pytest

from opbox import Resource, ValidationError, operator
from opbox.resource import parse_quantity


@pytest.mark.parametrize("text,value", [
    ("100m", Decimal("0.1")), ("0.5", Decimal("0.5")), ("2", Decimal(2)), ("512Mi", Decimal(512 * 2**20)),
    ("10Gi", Decimal(10 * 2**30)), ("1e3", Decimal(1000)), ("1.5G", Decimal(1_500_000_000)), (".5", Decimal("0.5")),
    ("250k", Decimal(250_000)), (3, Decimal(3)),
])
def test_quantities(text, value):
    assert parse_quantity(text) == value


@pytest.mark.parametrize("kwargs,message", [
    ({"cpu": "lots"}, "not a Kubernetes quantity"), ({"memory": "512MB"}, "not a Kubernetes quantity"),
    ({"memory": "-1Gi"}, "not a Kubernetes quantity"), ({"cpu": "0"}, "more than zero"),
    ({"memory": "100m"}, "less than one byte"), ({"disk": "10 Gi"}, "not a Kubernetes quantity"),
    ({"gpu": "nvidia tesla"}, "GPU type"), ({"gpu_count": -1}, "gpu_count"), ({"gpu_count": 1.5}, "gpu_count"),
    ({"timeout": 0}, "timeout"), ({"timeout": "10"}, "timeout"), ({"max_retries": 101}, "max_retries"),
    ({"env": {"A": 1}}, "env"), ({"cpu": True}, "quantity"),
])
def test_bad_values_are_clear_errors(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        Resource(**kwargs)


def test_good_resource_and_round_trip():
    res = Resource(cpu="100m", memory="512Mi", disk="10Gi", gpu="nvidia-tesla-t4", timeout=30, max_retries=2,
                   env={"MODE": "fast"})
    assert res.gpu_count == 1, "asking for a GPU type implies one GPU"
    assert res.memory_bytes == 512 * 2**20 and res.cpu_cores == 0.1 and res.disk_bytes == 10 * 2**30
    assert Resource.from_dict(res.to_dict()) == res
    with pytest.raises(ValidationError, match="unknown field"):
        Resource.from_dict({"cpus": "1"})


def test_bad_resource_fails_at_decoration():
    with pytest.raises(ValidationError, match="memory"):
        @operator(resource=Resource(memory="lots"))
        def f():
            pass
    with pytest.raises(ValidationError, match="timeout"):
        @operator(timeout=-1)
        def g():
            pass
    with pytest.raises(ValidationError, match="opbox.Resource"):
        operator(resource={"cpu": "1"})


def test_frozen():
    with pytest.raises(Exception):
        Resource(cpu="1").cpu = "2"
