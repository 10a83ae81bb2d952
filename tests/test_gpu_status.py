"""A machine without NVML or a GPU (this one, and CI): every command still works, and where device
memory would be it says why there is none, in the same words doctor uses."""

from __future__ import annotations

import pytest
from conftest import leakhunt_json, run_leakhunt

from leakhunt.analysis.device import open_nvml


@pytest.fixture(scope="module")
def no_gpu() -> str:
    reader, why = open_nvml()
    if reader is not None:
        reader.close()
        pytest.skip("NVML works here: these tests are for machines without a GPU")
    return why


@pytest.fixture
def steady(leakers, spawn):
    return spawn([leakers / "steady", "--rate", "1M"])


def test_doctor_says_device_memory_is_not_sampled_and_why(no_gpu):
    doc = leakhunt_json("doctor")
    (check,) = [c for c in doc["checks"] if c["name"] == "NVML / GPU"]
    assert not check["ok"] and check["optional"] and no_gpu in check["detail"]


def test_watch_says_why_where_device_memory_would_be(no_gpu, steady):
    doc = leakhunt_json("watch", "--pid", steady.pid, "--interval", "0.2s", "--duration", "1s")
    assert doc["device_memory"] == {"available": False, "reason": no_gpu}
    cp = run_leakhunt("watch", "--pid", steady.pid, "--interval", "0.2s", "--duration", "1s")
    assert cp.returncode == 0 and "device memory (NVML):" in cp.stdout + cp.stderr


def test_ci_gate_says_why_where_device_memory_would_be(no_gpu, steady):
    args = ("ci", "--pid", steady.pid, "--max-slope", "50MB/min", "--interval", "0.2s", "--duration", "3s")
    doc = leakhunt_json(*args)
    assert doc["status"] == "pass" and doc["device_memory"] == {"available": False, "reason": no_gpu}
    cp = run_leakhunt(*args)
    assert "device memory (NVML):" in cp.stdout + cp.stderr


def test_ci_refuses_to_gate_device_memory_it_cannot_sample(no_gpu, steady):
    """--max-device-slope where NVML does not work: exit 2 with one line, never a silent pass."""
    cp = run_leakhunt(
        "ci",
        "--pid",
        steady.pid,
        "--max-slope",
        "50MB/min",
        "--max-device-slope",
        "10MB/min",
        "--duration",
        "3s",
    )
    assert cp.returncode == 2
    last = cp.stderr.strip().splitlines()[-1]
    assert last == f"leakhunt: error: --max-device-slope: device memory cannot be sampled here: {no_gpu}"
    assert "Traceback" not in cp.stderr
