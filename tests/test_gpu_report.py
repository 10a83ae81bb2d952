"""Device memory in reports: a recording whose samples carry NVML's gpu_bytes gets a "Device
memory" section and plot, and a headline that names a GPU leak host RSS cannot see; a recording
made where there is no GPU says why in the environment section.

No GPU here, so the device series is written into a real watch recording of a real, flat process
(the shape NVML gives on a GPU machine: samples.jsonl's "gpu_bytes"); `make gpu-check` renders a
report of a recording made on a GPU (--leak device).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import leakhunt_json, read_markdown, run_leakhunt

from leakhunt.proc.classes import RegionClass
from leakhunt.proc.sampler import History
from leakhunt.record import SessionWriter, TreeRecorder
from leakhunt.report.recorded import load

MiB = 2**20


@pytest.fixture(scope="module")
def flat_recording(leakers, tmp_path_factory) -> Path:
    """watch --record of `steady` (busy, RSS flat) on this machine, where NVML is not there."""
    out = tmp_path_factory.mktemp("gpu-report") / "steady"
    proc = subprocess.Popen([leakers / "steady", "--rate", "2M"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        cp = run_leakhunt(
            "watch", "--pid", proc.pid, "--interval", "0.25s", "--duration", "4s", "--record", out, "--json"
        )
        assert cp.returncode == 0, cp.stderr
    finally:
        proc.terminate()
        proc.wait()
    return out


def _with_device_series(recording: Path, dest: Path, bytes_per_s: float) -> Path:
    """A copy of the recording whose samples carry a device series growing at bytes_per_s (with
    the jitter of a caching allocator's 2 MiB steps)."""
    shutil.copytree(recording, dest)
    lines = []
    for line in (recording / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        record["gpu_bytes"] = int(1200 * MiB + bytes_per_s * record["t"]) // (2 * MiB) * (2 * MiB)
        lines.append(json.dumps(record))
    (dest / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return dest


def test_device_leak_with_flat_rss_gets_its_own_section_and_headline(flat_recording, tmp_path):
    rec = _with_device_series(flat_recording, tmp_path / "device", 32 * MiB)
    doc = leakhunt_json("report", rec, "--markdown", tmp_path / "r.md")
    assert doc["verdict"] == "device_leak"
    assert "while host RSS is flat" in doc["answer"]
    assert "Device memory" in doc["sections"] and "device-memory" in doc["plots"]
    device = doc["device_memory"]
    assert device["available"] and device["leak"]
    assert 24 * MiB < device["slope_bytes_per_s"] < 40 * MiB
    md = read_markdown(tmp_path / "r.md")
    assert "## Device memory" in md and "tensors kept alive on the GPU" in md
    assert "device memory (NVML)" not in md  # no "not sampled" row when there is a series


def test_flat_device_memory_is_no_leak(flat_recording, tmp_path):
    rec = _with_device_series(flat_recording, tmp_path / "flat", 0.0)
    doc = leakhunt_json("report", rec, "--markdown", tmp_path / "r.md")
    assert doc["verdict"] != "device_leak" and "Device memory" in doc["sections"]
    assert doc["device_memory"]["available"] and not doc["device_memory"]["leak"]
    assert doc["device_memory"]["finding"] is None


def test_recording_without_gpu_says_why_where_device_memory_would_be(flat_recording, tmp_path):
    watch_summary = json.loads((flat_recording / "summary.json").read_text())
    assert watch_summary["device_memory"]["available"] is False
    doc = leakhunt_json("report", flat_recording, "--markdown", tmp_path / "r.md")
    assert "Device memory" not in doc["sections"]
    assert doc["device_memory"] == watch_summary["device_memory"]
    row = next(
        line for line in read_markdown(tmp_path / "r.md").splitlines() if "device memory (NVML)" in line
    )
    assert watch_summary["device_memory"]["reason"] in row


def test_tree_recording_keeps_the_tree_device_total(tmp_path):
    """watch --subprocesses records the tree's totals; the device total (summed over the tree's
    pids) travels with them into the report."""
    writer = SessionWriter(tmp_path / "tree", "watch", {"pid": 1, "subprocesses": True})
    recorder = TreeRecorder(writer, follow=True)
    tree = History()
    for i in range(12):
        tree.append(
            float(i),
            1e9 + i,
            100 * MiB,
            {RegionClass.ANON: 100 * MiB},
            {},
            {},
            0.0,
            gpu_bytes=(500 + 40 * i) * MiB,
        )
        recorder([], None, tree)
    writer.finish({"command": "watch"})
    data = load(tmp_path / "tree")
    assert data.history.gpu == [(500 + 40 * i) * MiB for i in range(12)]
    assert data.memory.device is not None and data.memory.device.verdict.leak


def _flat_host_growing_device(device_mib_per_s: float) -> History:
    """RSS flat, NVML's per-process bytes growing at 2 MiB granularity (the device-leak shape)."""
    history = History()
    for i in range(30):
        history.append(
            float(i),
            1e9 + i,
            300 * MiB,
            {RegionClass.ANON: 300 * MiB},
            {},
            {},
            0.0,
            gpu_bytes=int(1200 * MiB + device_mib_per_s * MiB * i) // (2 * MiB) * (2 * MiB),
        )
    return history


def test_ci_gates_device_memory_when_asked():
    """ci --max-device-slope: a device-only leak fails the gate, which RSS alone passes; growth
    under the device limit passes and says so."""
    from leakhunt.ci import FAIL, PASS, GateConfig, decide, gate_summary

    leaking = _flat_host_growing_device(4)  # 240 MiB/min on the device
    rss_only = GateConfig(max_slope=5e6 / 60, duration=30)
    assert decide(gate_summary(leaking, rss_only), rss_only)[0] == PASS
    gated = GateConfig(max_slope=5e6 / 60, duration=30, max_device_slope=10 * MiB / 60)
    code, reason = decide(gate_summary(leaking, gated), gated)
    assert code == FAIL and reason.startswith("device memory grows") and "device limit of" in reason
    roomy = GateConfig(max_slope=5e6 / 60, duration=30, max_device_slope=500 * MiB / 60)
    code, reason = decide(gate_summary(leaking, roomy), roomy)
    assert code == PASS and "device memory within" in reason
