"""`leakhunt trace-mmap --backend gdb` as a user runs it: the same document as the BPF backends with
full stacks, its budgets and cost, and every way it can end leaving the target running, untraced."""

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
from test_gdb_support import makes_progress, tracer, wait_untraced

pytestmark = pytest.mark.gdb

POOL_CHAIN = ("syscall", "lkpool_grow", "lkpool_mpool_get", "lkpool_event_dispatch", "lkpool_release")


def test_trace_mmap_with_gdb_names_the_pool_with_its_full_stack(spawn, leakers):
    proc = spawn([leakers / "pool_leaker", "--rate", "4M", "--chunk", "1M", "--churn", "20"])
    doc = leakhunt_json("trace-mmap", "--pid", proc.pid, "--backend", "gdb", "--duration", "3s")
    assert doc["backend"] == "gdb" and doc["stopped_because"] == "duration"
    top = doc["by_caller"][0]
    assert (top["library"], top["symbol"]) == ("libleakpool.so", "lkpool_grow")
    # the churn is given back: at most one 1 MiB pair is cut by the window's end (mmap seen, its
    # munmap after the detach)
    assert top["outstanding_bytes"] > 0 and doc["outstanding_bytes"] - top["outstanding_bytes"] <= 2**20
    symbols = [frame.split("!")[1].split("+")[0] for frame in top["stack"]]
    assert tuple(symbols[:5]) == POOL_CHAIN and not top["stack_partial"]
    details = doc["backend_details"]
    assert details["detached"] and details["lost"] == 0 and details["hits"] == doc["events"]
    assert details["cost"]["hits"] == doc["events"] and details["cost"]["mean_hit_s"] > 0
    assert any(note.startswith("gdb: target stopped") for note in doc["notes"])
    assert tracer(proc.pid) == 0 and makes_progress(proc.pid)


def test_the_hit_budget_ends_the_trace_early(spawn, leakers):
    proc = spawn([leakers / "pool_leaker", "--rate", "4M", "--churn", "20"])
    doc = leakhunt_json(
        "trace-mmap",
        "--pid",
        proc.pid,
        "--backend",
        "gdb",
        "--duration",
        "60s",
        "--gdb-max-hits",
        "8",
        "--min-size",
        "64K",
    )
    assert doc["stopped_because"] == "backend finished: hit budget reached (8 hits)"
    assert doc["events"] == 8 and doc["duration_s"] < 60
    assert tracer(proc.pid) == 0 and proc.alive()


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_sigterm_or_ctrl_c_detaches_and_prints_the_summary(spawn, leakers, how):
    proc = spawn([leakers / "pool_leaker", "--rate", "2M", "--churn", "20"])
    # The signal must be what ends it: at ~1,300 calls/s the default hit budget (1000) can run
    # out before it arrives, and the trace then ends as "backend finished".
    argv = ["trace-mmap", "--pid", str(proc.pid), "--backend", "gdb", "--gdb-max-hits", "10000000"]
    cli = subprocess.Popen(
        [sys.executable, "-m", "leakhunt", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait_traced_for_a_while(proc.pid)
    if how == "sigterm":
        cli.send_signal(signal.SIGTERM)
    else:
        os.killpg(cli.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, err
    assert "stopped: interrupted" in out and "lkpool_grow" in out
    assert tracer(proc.pid) == 0 and makes_progress(proc.pid)


def test_sigkill_of_the_cli_leaves_the_target_running_untraced(spawn, leakers):
    proc = spawn([leakers / "pool_leaker", "--rate", "4M", "--churn", "50"])
    cli = subprocess.Popen(
        [sys.executable, "-m", "leakhunt", "trace-mmap", "--pid", str(proc.pid), "--backend", "gdb"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_traced_for_a_while(proc.pid)
    cli.kill()
    cli.wait()
    assert wait_untraced(proc.pid) == 0
    assert makes_progress(proc.pid, 2.0) and proc.alive()


def test_the_target_exiting_mid_trace_is_said_and_what_was_traced_kept(spawn, leakers):
    proc = spawn([leakers / "pool_leaker", "--rate", "4M", "--churn", "20", "--duration", "3"])
    cp = run_leakhunt("trace-mmap", "--pid", proc.pid, "--backend", "gdb", "--duration", "60s", "--json")
    # trace-mmap's contract for every backend (tests/test_trace_cli.py): the document on stdout,
    # one line on stderr saying so, and exit 2, as every command whose target exits mid-run.
    assert cp.returncode == 2, cp.stderr
    assert "exited" in cp.stderr.strip().splitlines()[-1]
    doc = json.loads(cp.stdout)
    assert doc["stopped_because"] == "target exited" and doc["events"] > 0
    assert doc["by_caller"][0]["symbol"] == "lkpool_grow"
    assert doc["backend_details"]["end"] == "target exited (exit status 0)"


def test_an_unusable_gdb_is_one_line(spawn, leakers):
    proc = spawn([leakers / "steady", "--rate", "1M"])
    cp = run_leakhunt(
        "trace-mmap",
        "--pid",
        proc.pid,
        "--backend",
        "gdb",
        "--gdb-path",
        "/nonexistent/gdb",
        "--duration",
        "1s",
    )
    assert cp.returncode == 2
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and "/nonexistent/gdb not found" in lines[0], lines
    assert tracer(proc.pid) == 0


def test_a_traced_target_is_one_line(spawn, leakers):
    proc = spawn([leakers / "steady", "--rate", "1M"])
    strace = subprocess.Popen(["strace", "-p", str(proc.pid), "-o", "/dev/null"], stderr=subprocess.DEVNULL)
    try:
        _wait_traced_for_a_while(proc.pid, settle=0)
        cp = run_leakhunt("trace-mmap", "--pid", proc.pid, "--backend", "gdb", "--duration", "1s")
    finally:
        strace.terminate()
        strace.wait()
    assert cp.returncode == 2
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and "already traced" in lines[0] and "strace" in lines[0], lines


DROP = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_without_root_gdb_traces_the_users_own_process(spawn, leakers, tmp_path):
    need(
        os.geteuid() == 0 and shutil.which("setpriv") is not None, "needs root and setpriv to drop privileges"
    )
    proc = spawn([*DROP, leakers / "pool_leaker", "--rate", "4M", "--chunk", "1M"])
    cp = subprocess.run(
        [
            *DROP,
            sys.executable,
            "-m",
            "leakhunt",
            "trace-mmap",
            "--pid",
            str(proc.pid),
            "--backend",
            "gdb",
            "--duration",
            "2s",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["by_caller"][0]["symbol"] == "lkpool_grow"
    assert tracer(proc.pid) == 0 and proc.alive()


def test_without_root_another_users_process_is_one_line(spawn, leakers):
    need(
        os.geteuid() == 0 and shutil.which("setpriv") is not None, "needs root and setpriv to drop privileges"
    )
    proc = spawn([leakers / "steady", "--rate", "1M"])  # root's
    cp = subprocess.run(
        [
            *DROP,
            sys.executable,
            "-m",
            "leakhunt",
            "trace-mmap",
            "--pid",
            str(proc.pid),
            "--backend",
            "gdb",
            "--duration",
            "1s",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cp.returncode == 2
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and "permission denied" in lines[0] and "root" in lines[0], lines


def _wait_traced_for_a_while(pid: int, settle: float = 1.5) -> None:
    deadline = time.monotonic() + 60
    while not tracer(pid):
        assert time.monotonic() < deadline, "never traced"
        time.sleep(0.05)
    time.sleep(settle)  # symbols read, breakpoints in, hits coming
