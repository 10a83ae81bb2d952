"""`leakhunt trace-mmap` as a user runs it: the bar on the pool leaker, recording, the target
exiting, Ctrl-C/SIGTERM, and the one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import leakhunt_json, need, run_leakhunt, start_tracing

from leakhunt.record import Recording
from leakhunt.report.streams import read_callers

BACKENDS = ["bcc", "bpftrace"]


def test_a_pid_that_does_not_exist_is_one_line():
    cp = run_leakhunt("trace-mmap", "--pid", "999999999", "--duration", "1s")
    assert cp.returncode == 2
    assert cp.stderr.strip().count("\n") == 0 and "999999999" in cp.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_root_the_bpf_backends_say_what_is_missing(spawn, leakers, backend):
    need(
        os.geteuid() == 0 and shutil.which("setpriv") is not None, "needs root and setpriv to drop privileges"
    )
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    proc = spawn([*drop, leakers / "pool_leaker", "--rate", "1M"])
    cp = subprocess.run(
        [
            *drop,
            sys.executable,
            "-m",
            "leakhunt",
            "trace-mmap",
            "--pid",
            str(proc.pid),
            "--backend",
            backend,
            "--duration",
            "1s",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cp.returncode == 2, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and "root" in lines[0] and "leakhunt doctor --install" in lines[0], lines


@pytest.mark.bpf
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_pool_library_is_named_first_past_the_syscall_wrapper(spawn, leakers, backend):
    """The libucm pattern: a library grows a pool with syscall(SYS_mmap) under balanced mmap
    churn. The caller past glibc's syscall() wrapper must come first with >= 95% of the bytes."""
    proc = spawn([leakers / "pool_leaker", "--rate", "4M", "--chunk", "1M", "--churn", "300"])
    doc = leakhunt_json("trace-mmap", "--pid", proc.pid, "--backend", backend, "--duration", "3s")
    assert doc["backend"] == backend and doc["stopped_because"] == "duration"
    top = doc["by_caller"][0]
    assert (top["library"], top["symbol"]) == ("libleakpool.so", "lkpool_grow")
    assert top["outstanding_bytes"] >= 0.95 * doc["outstanding_bytes"] > 0
    assert top["count"] >= 2 and top["mapped_bytes"] >= top["outstanding_bytes"]
    frames = " ".join(top["stack"])
    for deeper in ("syscall", "lkpool_mpool_get", "lkpool_event_dispatch", "lkpool_release"):
        assert deeper in frames, top["stack"]
    churn = sum(c["count"] for c in doc["by_caller"][1:])
    assert churn > 100 and doc["events"] >= churn and doc["lost_events"] == 0
    assert proc.alive()


@pytest.mark.bpf
@pytest.mark.parametrize("backend", BACKENDS)
def test_subprocesses_traces_the_children_that_exist_already(spawn, leakers, backend):
    """--subprocesses on a parent whose leaking child was forked before the trace began: the
    child's mappings are traced (bcc adds it to its running program, bpftrace starts with it)."""
    import psutil

    proc = spawn([leakers / "tree", "--rate", "4M", "--shared", "8M", "--late", "0"])
    deadline = time.monotonic() + 10
    while len(psutil.Process(proc.pid).children()) < 2:
        assert time.monotonic() < deadline, "the tree leaker did not fork its two children"
        time.sleep(0.1)
    doc = leakhunt_json(
        "trace-mmap", "--pid", proc.pid, "--subprocesses", "--backend", backend, "--duration", "3s"
    )
    by_symbol = {c["symbol"]: c["outstanding_bytes"] for c in doc["by_caller"]}
    assert by_symbol.get("leaking", 0) >= 4 << 20, doc["by_caller"]
    assert not doc["notes"] or "not traced" not in " ".join(doc["notes"])
    alone = leakhunt_json("trace-mmap", "--pid", proc.pid, "--backend", backend, "--duration", "2s")
    assert "leaking" not in {c["symbol"] for c in alone["by_caller"]}  # the parent itself does not leak
    assert proc.alive()


@pytest.mark.bpf
def test_recording_holds_events_and_the_ledger_over_time(spawn, leakers, tmp_path):
    proc = spawn([leakers / "pool_leaker", "--rate", "4M", "--churn", "50"])
    rec_dir = tmp_path / "rec"
    doc = leakhunt_json(
        "trace-mmap",
        "--pid",
        proc.pid,
        "--duration",
        "3s",
        "--all-events",
        "--min-size",
        "64K",
        "--record",
        rec_dir,
    )
    rec = Recording.open(rec_dir)
    assert rec.complete and rec.summary["by_caller"][0]["symbol"] == "lkpool_grow"
    events = list(rec.records("events"))
    assert len(events) == doc["streamed_events"] > 50
    grows = [e for e in events if e.get("caller") and e["caller"][2] == "lkpool_grow"]
    assert grows and all(e["kind"] == "mmap" and e["length"] == 1 << 20 for e in grows)
    ledger = list(rec.records("ledger"))
    assert len(ledger) >= 2 and ledger[-1]["callers"][0]["caller"] == "libleakpool.so!lkpool_grow"
    assert ledger[-1]["outstanding_bytes"] >= ledger[0]["outstanding_bytes"]
    series = read_callers(rec, None)  # what the report's plot reads
    assert series is not None and series.callers[0] == "libleakpool.so!lkpool_grow"
    outstanding = list(rec.records("outstanding"))
    assert sum(o["bytes"] for o in outstanding) == doc["outstanding_bytes"]


@pytest.mark.bpf
def test_auto_picks_bcc_and_min_size_filters(spawn, leakers):
    proc = spawn([leakers / "pool_leaker", "--rate", "4M", "--chunk", "1M", "--churn", "50"])
    cp = run_leakhunt("trace-mmap", "--pid", proc.pid, "--duration", "2s", "--min-size", "2M", "--json")
    doc = json.loads(cp.stdout)
    assert doc["backend"] == "bcc" and doc["backends_unavailable"] == {}  # every backend works in CI
    assert cp.stderr.splitlines()[0] == "backend bcc"
    assert doc["outstanding_bytes"] == 0 and doc["filtered_events"] > 0


def rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.bpf
def test_the_target_exiting_mid_trace_keeps_what_was_traced(spawn, leakers):
    proc = spawn([leakers / "pool_leaker", "--rate", "4M"])
    tracer = start_tracing("--pid", proc.pid, "--duration", "120s", "--json")
    deadline = time.monotonic() + 120
    # The target leaks a few chunks while traced, then exits on its own accord.
    start = rss(proc.pid)
    while rss(proc.pid) < start + (4 << 20):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.popen.terminate()
    out, err = tracer.communicate(timeout=60)
    assert tracer.returncode == 2  # the run ended early: the summary is printed, the code says so
    assert "exited" in err.strip().splitlines()[-1]
    doc = json.loads(out)
    assert doc["stopped_because"] == "target exited"
    assert doc["by_caller"][0]["symbol"] == "lkpool_grow" and doc["outstanding_bytes"] > 0


@pytest.mark.bpf
def test_sigterm_ends_with_a_summary_and_the_target_untouched(spawn, leakers):
    proc = spawn([leakers / "pool_leaker", "--rate", "2M"])
    tracer = start_tracing("--pid", proc.pid)
    time.sleep(3)
    tracer.send_signal(signal.SIGTERM)
    out, err = tracer.communicate(timeout=60)
    assert tracer.returncode == 0, err
    assert "stopped: interrupted" in out
    table = out[out.index("outstanding by caller") :]
    assert table.splitlines()[2].startswith("libleakpool.so!lkpool_grow")
    assert proc.alive()
