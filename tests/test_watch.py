"""`leakhunt watch` end to end on real leakers: the rate it measures, its verdicts, and how it
behaves when the target vanishes, is not ours to read, or when it is stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import leakhunt_json, need, run_leakhunt

from leakhunt.record import Recording

MiB = 2**20
WATCH_S = 20


@pytest.fixture(scope="module")
def watched(leakers):
    """The syscall-pool leaker and the two controls, each watched for 20 s at the same time."""
    targets = {
        "pool": [leakers / "pool_leaker", "--rate", "4M", "--chunk", "512K", "--churn", "50"],
        "plateau": [leakers / "plateau", "--rate", "6M", "--cap", "60M", "--chunk", "1M"],
        "steady": [leakers / "steady", "--rate", "16M", "--chunk", "256K"],
    }
    procs, watches = {}, {}
    try:
        for name, argv in targets.items():
            procs[name] = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, text=True)
            assert procs[name].stdout.readline().startswith("ready")
        for name, p in procs.items():
            watches[name] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "leakhunt",
                    "watch",
                    "--pid",
                    str(p.pid),
                    "--duration",
                    f"{WATCH_S}s",
                    "--json",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        results = {}
        for name, w in watches.items():
            out, err = w.communicate(timeout=120)
            assert w.returncode == 0, err
            results[name] = json.loads(out)
        return results
    finally:
        for p in [*procs.values(), *watches.values()]:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_syscall_pool_leak_rate_within_15_percent(watched):
    doc = watched["pool"]
    assert doc["leak"] is True
    assert doc["rss_slope_bytes_per_s"] == pytest.approx(4 * MiB, rel=0.15)
    lo, hi = doc["slope_interval"]
    assert lo <= doc["rss_slope_bytes_per_s"] <= hi
    assert doc["samples"] >= WATCH_S
    assert doc["duration_s"] == pytest.approx(WATCH_S, abs=1.5)


def test_syscall_pool_top_group_is_anonymous(watched):
    doc = watched["pool"]
    top = doc["top_groups"][0]
    assert top["class"] == "anon" and top["path"] == ""
    assert top["rss_growth_bytes"] > 0.8 * doc["rss_growth_bytes"]
    assert doc["classes"]["anon"]["leak"] is True
    assert doc["top_regions"][0]["class"] == "anon"


def test_plateau_control_is_not_a_leak(watched):
    doc = watched["plateau"]
    assert doc["leak"] is False
    assert doc["rss_bytes_end"] - doc["rss_bytes_start"] > 20 * MiB  # it did grow, early


def test_steady_control_is_not_a_leak(watched):
    doc = watched["steady"]
    assert doc["leak"] is False
    assert abs(doc["rss_growth_bytes"]) < 8 * MiB


def test_json_document_has_the_contract_fields(watched):
    doc = watched["steady"]
    for key in (
        "pid",
        "duration_s",
        "samples",
        "rss_bytes_start",
        "rss_bytes_end",
        "rss_slope_bytes_per_s",
        "slope_interval",
        "leak",
        "classes",
        "top_groups",
    ):
        assert key in doc
    for c in doc["classes"].values():
        assert {"rss_bytes", "slope_bytes_per_s"} <= set(c)


def test_pid_that_does_not_exist():
    cp = run_leakhunt("watch", "--pid", "4999999", "--duration", "2s")
    assert cp.returncode == 2
    assert cp.stderr.strip() == "leakhunt: error: no process with pid 4999999"
    assert "Traceback" not in cp.stderr


def test_target_that_exits_mid_run_keeps_its_summary(leakers, spawn):
    proc = spawn([leakers / "pool_leaker", "--rate", "2M", "--duration", "3"])
    cp = run_leakhunt("watch", "--pid", proc.pid, "--duration", "20s", "--interval", "0.5s")
    assert cp.returncode == 2
    assert "summary" in cp.stdout and "RSS" in cp.stdout
    last = cp.stderr.strip().splitlines()
    assert len(last) == 1 and "exited" in last[0] and "samples kept" in last[0]


def test_a_process_we_may_not_read(leakers, spawn):
    need(
        os.geteuid() == 0 and shutil.which("setpriv") is not None, "needs root and setpriv to drop privileges"
    )
    proc = spawn([leakers / "steady", "--rate", "1M"])
    cp = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "leakhunt",
            "watch",
            "--pid",
            str(proc.pid),
            "--duration",
            "2s",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cp.returncode == 2, cp.stderr
    assert "permission denied" in cp.stderr and len(cp.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopping_watch_prints_a_summary(leakers, spawn, sig, tmp_path):
    proc = spawn([leakers / "pool_leaker", "--rate", "2M"])
    watch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "leakhunt",
            "watch",
            "--pid",
            str(proc.pid),
            "--interval",
            "0.5s",
            "--record",
            str(tmp_path / "rec"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # SIGABRT prints every thread's stack
        # Started as a background job of a script is (SIGINT ignored, which Python keeps): the
        # signal still stops it. CI harnesses and supervisors start it that way.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    deadline = time.monotonic() + 60
    while _samples_recorded(tmp_path / "rec") < 4:
        assert watch.poll() is None and time.monotonic() < deadline, "watch never recorded 4 samples"
        time.sleep(0.1)
    watch.send_signal(sig)
    try:
        out, err = watch.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        dispositions = _signal_masks(watch.pid)
        watch.send_signal(signal.SIGABRT)
        _, err = watch.communicate(timeout=30)
        pytest.fail(f"watch ignored {sig.name} for 30 s ({dispositions}); its threads:\n{err[-4000:]}")
    assert watch.returncode == 0, err
    assert "stopped: interrupted" in out
    assert proc.alive()
    rec = Recording.open(tmp_path / "rec")
    assert rec.complete and len(rec.samples()) >= 4


def _samples_recorded(rec) -> int:
    try:
        return (rec / "samples.jsonl").read_text().count("\n")
    except OSError:
        return 0


def _signal_masks(pid: int) -> str:
    """The process's blocked, ignored and caught signals, as the kernel says."""
    try:
        lines = open(f"/proc/{pid}/status").read().splitlines()
    except OSError as e:
        return str(e)
    return ", ".join(line for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def test_recording_survives_leakhunt_being_killed(leakers, spawn, tmp_path):
    proc = spawn([leakers / "pool_leaker", "--rate", "2M"])
    watch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "leakhunt",
            "watch",
            "--pid",
            str(proc.pid),
            "--interval",
            "0.25s",
            "--record",
            str(tmp_path / "rec"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(4)
    watch.kill()
    watch.wait()
    rec = Recording.open(tmp_path / "rec")
    assert not rec.complete
    frame = rec.samples_frame()
    assert len(frame) >= 5
    assert frame["rss"].is_monotonic_increasing
    assert list(rec.dir.glob("snapshots/*.smaps.gz"))  # the first sample's full smaps


def test_watch_records_a_session_that_reads_back(leakers, spawn, tmp_path):
    proc = spawn([leakers / "pool_leaker", "--rate", "4M"])
    doc = leakhunt_json(
        "watch", "--pid", proc.pid, "--duration", "4s", "--interval", "0.5s", "--record", tmp_path / "rec"
    )
    rec = Recording.open(tmp_path / "rec")
    assert rec.complete and rec.summary["samples"] == doc["samples"]
    frame = rec.samples_frame()
    assert len(frame) == doc["samples"]
    assert frame["class_anon"].iloc[-1] > frame["class_anon"].iloc[0]
    groups = rec.groups_frame()
    assert set(groups["class"]) >= {"anon", "lib"}
    assert rec.session["command"] == "watch" and rec.session["pid"] == proc.pid


def test_without_a_gpu_device_memory_says_why(watched):
    device = watched["steady"]["device_memory"]
    assert device["available"] is False
    assert "NVML" in device["reason"] or "nvidia-ml-py" in device["reason"]
