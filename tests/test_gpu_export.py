"""The exporter's device-memory metrics: where NVML works, each process gets its device bytes, slope
with 95% bounds and verdict; where it does not (this machine), the exporter says so in one gauge,
its start-up line and --json, and everything else is exported as before.

NVML cannot run here (no NVIDIA driver), so one test stands a reader in for it that reports a
growing device series for a real process; the GPU machine's `make gpu-check` scrapes the real one.
"""

from __future__ import annotations

import subprocess
import time

import pytest
from conftest import leakhunt_json
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from leakhunt.analysis.device import open_nvml
from leakhunt.export import Fleet, TickDevice, registry_for

MiB = 2**20


class GrowingDevice:
    """Stands in for NvmlReader on a machine without a GPU: 64 MiB more device memory per sweep
    for every pid it is asked about. Counts its sweeps (the exporter must make one per tick)."""

    def __init__(self) -> None:
        self.sweeps = 0

    def used_by(self, pids: set[int]) -> dict[int, int]:
        self.sweeps += 1
        return {pid: (1024 + 64 * self.sweeps) * MiB for pid in pids}

    def close(self) -> None:
        pass


@pytest.fixture
def steady(leakers):
    proc = subprocess.Popen([leakers / "steady", "--rate", "1M"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("ready")
    yield proc
    proc.terminate()
    proc.wait()


def _scrape(fleet: Fleet) -> dict[str, list]:
    text = generate_latest(registry_for(fleet)).decode()
    by_name: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            by_name.setdefault(sample.name, []).append(sample)
    return by_name


def test_device_memory_gauge_slope_and_verdict_per_process(steady):
    fleet = Fleet([steady.pid], interval=0.05, device=False)
    reader = GrowingDevice()
    fleet.device = TickDevice(reader)
    for _ in range(12):
        fleet.sample_once()
        time.sleep(0.05)
    metrics = _scrape(fleet)
    pid = str(steady.pid)
    assert reader.sweeps == 12  # one NVML sweep per tick for the whole fleet
    (gauge,) = metrics["leakhunt_device_memory_bytes"]
    assert gauge.labels["pid"] == pid and gauge.value == (1024 + 64 * 12) * MiB
    slopes = {s.labels["bound"]: s.value for s in metrics["leakhunt_device_memory_slope_bytes_per_second"]}
    assert set(slopes) == {"estimate", "lower", "upper"} and slopes["lower"] > 0
    assert metrics["leakhunt_device_memory_leak"][0].value == 1.0
    assert metrics["leakhunt_device_memory_sampled"][0].value == 1.0
    # RSS of the busy-but-flat process is no leak: the two series are judged apart.
    total_leak = next(s for s in metrics["leakhunt_leak"] if s.labels["class"] == "total")
    assert total_leak.value == 0.0


def test_without_nvml_the_exporter_says_so_and_exports_the_rest(steady):
    reader, why = open_nvml()
    if reader is not None:
        reader.close()
        pytest.skip("NVML works here: this test is for machines without a GPU")
    fleet = Fleet([steady.pid], interval=0.05)
    fleet.sample_once()
    metrics = _scrape(fleet)
    assert metrics["leakhunt_device_memory_sampled"][0].value == 0.0
    assert "leakhunt_device_memory_bytes" not in metrics
    assert metrics["leakhunt_process_rss_bytes"][0].value > 0
    doc = leakhunt_json(
        "export", "--pid", steady.pid, "--port", "0", "--interval", "0.2s", "--duration", "1s"
    )
    assert doc["device_memory"] == {"available": False, "reason": why}
    assert doc["targets"][0]["device_memory_bytes"] is None
