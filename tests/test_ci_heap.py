"""memray beside the gate: the Python heap next to RSS for a Python target that leaks through raw
mmap syscalls, in run mode (`ci --heap -- python ...`) and attach mode (`ci --heap --pid`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import gdb_call_hazard, leakhunt_json, read_markdown, run_leakhunt

pytest.importorskip("memray", reason="memray (the dev extra) is not installed")

# 1 MiB a tick through syscall(SYS_mmap), which memray's hooks never see, and 128 KiB a tick of
# Python objects, which they do.
LEAKER = """
import ctypes, sys, time
libc = ctypes.CDLL(None); libc.syscall.restype = ctypes.c_long
keep = []
print("ready", flush=True)
try:
    while True:
        addr = libc.syscall(9, 0, 1 << 20, 3, 0x22, -1, 0)
        ctypes.memset(addr, 1, 1 << 20)
        keep.append(bytearray(128 << 10))
        time.sleep(0.1)
except KeyboardInterrupt:
    pass
"""


@pytest.fixture
def leaker_script(tmp_path):
    path = tmp_path / "pyleaker.py"
    path.write_text(LEAKER)
    return path


def _gap_share(report_md: str) -> float:
    line = next(line for line in report_md.splitlines() if "Outside the heap" in line)
    return int(line.split("(")[1].split("%")[0]) / 100


def test_run_mode_shows_the_heap_beside_rss(leaker_script, tmp_path):
    cp = run_leakhunt(
        "ci",
        "--max-slope",
        "1MB/min",
        "--duration",
        "4s",
        "--interval",
        "0.5s",
        "--heap",
        "--record",
        tmp_path / "rec",
        "--json",
        "--",
        sys.executable,
        leaker_script,
    )
    assert cp.returncode == 1, cp.stderr
    doc = json.loads(cp.stdout)
    assert 2 << 20 < doc["heap_growth_bytes"] < doc["summary"]["rss_growth_bytes"] / 3
    assert (tmp_path / "rec" / "memray.bin").is_file()
    report = leakhunt_json("report", tmp_path / "rec", "--markdown", tmp_path / "r.md")
    assert report["heap_data"] and "heap-vs-rss" in report["plots"]
    assert _gap_share(read_markdown(tmp_path / "r.md")) > 0.5


@pytest.mark.gdb
@pytest.mark.gdb_calls
def test_attach_mode_shows_the_heap_beside_rss(leaker_script, spawn, tmp_path):
    target = spawn([sys.executable, leaker_script])
    cp = run_leakhunt(
        "ci",
        "--max-slope",
        "1MB/min",
        "--duration",
        "4s",
        "--interval",
        "0.5s",
        "--heap",
        "--pid",
        target.pid,
        "--record",
        tmp_path / "rec",
        "--json",
    )
    assert cp.returncode == 1, cp.stderr
    assert target.alive(), "the target survives memray's attach and detach"
    assert json.loads(cp.stdout)["heap_growth_bytes"] > 1 << 20
    report = leakhunt_json("report", tmp_path / "rec", "--markdown", tmp_path / "r.md")
    assert report["heap_data"] and _gap_share(read_markdown(tmp_path / "r.md")) > 0.5


def test_heap_needs_a_python_command(leakers):
    cp = run_leakhunt("ci", "--max-slope", "1MB/min", "--duration", "2s", "--heap", "--", leakers / "steady")
    assert cp.returncode == 2 and "needs a Python command" in cp.stderr


@pytest.mark.gdb
@pytest.mark.gdb_calls
def test_watch_heap_records_the_heap_stream(leaker_script, spawn, tmp_path):
    target = spawn([sys.executable, leaker_script])
    doc = leakhunt_json(
        "watch",
        "--pid",
        target.pid,
        "--duration",
        "4s",
        "--interval",
        "0.5s",
        "--heap",
        "--record",
        tmp_path / "rec",
    )
    assert doc["heap_growth_bytes"] > 1 << 20 and target.alive()
    assert (tmp_path / "rec" / "heap.jsonl").read_text().count("\n") >= 5
    report = leakhunt_json("report", tmp_path / "rec", "--markdown", tmp_path / "r.md")
    assert report["heap_data"] and _gap_share(read_markdown(tmp_path / "r.md")) > 0.5


def _tracking(pid: int, capture: str) -> bool:
    """Whether the target still has memray's capture file open (the tracker writes it)."""
    fds = Path(f"/proc/{pid}/fd")
    return any(os.readlink(fd).startswith(capture) for fd in fds.iterdir() if fd.is_symlink())


@pytest.mark.gdb
@pytest.mark.gdb_calls
def test_memray_stops_tracking_when_leakhunt_is_killed(leaker_script, spawn, tmp_path):
    """SIGKILL leaves no detach to run: the watchdog leakhunt carries into the target with memray's
    payload deactivates the tracker once leakhunt is gone, and the target runs on, not stopped."""
    target = spawn([sys.executable, leaker_script])
    watch = subprocess.Popen(
        [sys.executable, "-m", "leakhunt", "watch", "--pid", str(target.pid), "--heap", "--json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _tracking(target.pid, "/tmp/leakhunt-heap-"):
            assert watch.poll() is None, watch.stderr.read().decode()
            assert time.monotonic() < deadline, "memray never attached"
            time.sleep(0.2)
        os.killpg(watch.pid, signal.SIGKILL)
        watch.wait()
        deadline = time.monotonic() + 10
        while _tracking(target.pid, "/tmp/leakhunt-heap-"):
            assert time.monotonic() < deadline, "memray still tracks 10 s after leakhunt died"
            time.sleep(0.2)
    finally:
        if watch.poll() is None:
            os.killpg(watch.pid, signal.SIGKILL)
            watch.wait()
    assert target.alive() and psutil.Process(target.pid).status() != psutil.STATUS_STOPPED


@pytest.mark.gdb
def test_attach_is_refused_where_gdb_would_corrupt_the_target(leaker_script, spawn):
    """Where gdb cannot write the CPU's extended register state back after calling into a process
    (seen: an AMX Xeon, kernel 6.18, gdb 13.1), memray's injection through gdb would leave the
    target running on registers gdb failed to restore: a sleeping Python target raised OSError 514
    from inside time.sleep. leakhunt refuses with one line and leaves the target as it was."""
    hazard = gdb_call_hazard()
    if hazard is None:
        pytest.skip("gdb calls into processes safely here: the attach tests above run instead")
    target = spawn([sys.executable, leaker_script])
    cp = run_leakhunt("ci", "--max-slope", "1MB/min", "--duration", "2s", "--heap", "--pid", target.pid)
    assert cp.returncode == 2
    (line,) = cp.stderr.splitlines()
    assert line.startswith("leakhunt: error: memray unavailable: not attached") and hazard in line
    before = psutil.Process(target.pid).memory_info().rss
    deadline = time.monotonic() + 10  # the target runs on: its Python loop keeps allocating
    while psutil.Process(target.pid).memory_info().rss < before + (4 << 20):
        assert time.monotonic() < deadline, "the target stopped running after the refusal"
        time.sleep(0.2)
    status = psutil.Process(target.pid).status()
    assert target.alive() and status not in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
