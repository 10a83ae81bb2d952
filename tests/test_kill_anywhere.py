"""SIGKILL of leakhunt at random points of every command that touches a process: the target must run
on as it was (not stopped, not traced, its threads and open files as before), and nothing of
leakhunt's may stay behind (child processes, BPF programs, uprobes).

Each command is killed twice: once early (start-up: BPF compiles, gdb attaches, memray injects)
and once while it runs. The points come from a seeded generator (LEAKHUNT_KILL_SEED, default 17),
printed in every failure so that a failing point can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import gdb_call_hazard

SEED = int(os.environ.get("LEAKHUNT_KILL_SEED", "17"))
EARLY, LATE = (0.1, 2.5), (2.5, 9.0)
SETTLE_S = 10.0  # how long leftovers get to notice leakhunt is gone (bpftrace's pipe, gdb's stdin)

#: (leakhunt's arguments, target) with {pid} and {port} filled in; target "native" is a C leaker,
#: "python" a Python process (memray attaches only to Python).
COMMANDS = {
    "watch": (["watch", "--pid", "{pid}", "--interval", "0.5s"], "native"),
    "watch --heap": (["watch", "--pid", "{pid}", "--interval", "0.5s", "--heap"], "python"),
    "trace-mmap bcc": (["trace-mmap", "--pid", "{pid}", "--backend", "bcc"], "native"),
    "trace-mmap --faults": (["trace-mmap", "--pid", "{pid}", "--faults"], "native"),
    "trace-mmap bpftrace": (["trace-mmap", "--pid", "{pid}", "--backend", "bpftrace"], "native"),
    "trace-mmap gdb": (["trace-mmap", "--pid", "{pid}", "--backend", "gdb"], "native"),
    "investigate": (["investigate", "--pid", "{pid}", "--interval", "0.5s"], "native"),
    "ci": (["ci", "--pid", "{pid}", "--max-slope", "1MB/min", "--duration", "60s"], "native"),
    "export": (["export", "--pid", "{pid}", "--port", "{port}", "--interval", "1s"], "native"),
}

PYTHON_TARGET = """
import time
keep = []
print("ready", flush=True)
while True:
    keep.append(bytearray(64 * 1024))
    if len(keep) > 400:
        keep.clear()
    time.sleep(0.005)
"""


def _points() -> list[tuple[str, str, float]]:
    rng = random.Random(SEED)
    return [
        (name, phase, round(rng.uniform(*span), 2))
        for name in COMMANDS
        for phase, span in (("early", EARLY), ("late", LATE))
    ]


def _fds(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.add(f"{fd.name}->{os.readlink(fd)}")
        except OSError:
            pass
    return out


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _bpf_holders() -> set[int]:
    """Processes that hold a BPF program open (programs die with the last descriptor)."""
    holders = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == "anon_inode:bpf-prog":
                    holders.add(int(proc.name))
                    break
        except OSError:
            continue
    return holders


def _uprobes() -> str:
    try:
        return Path("/sys/kernel/tracing/uprobe_events").read_text()
    except OSError:
        return ""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.bpf
@pytest.mark.gdb
@pytest.mark.parametrize(("name", "phase", "at"), _points(), ids=lambda v: str(v))
def test_sigkill_anywhere_leaves_the_target_as_it_was(name, phase, at, leakers, spawn, tmp_path):
    args, kind = COMMANDS[name]
    if kind == "python":
        pytest.importorskip("memray", reason="memray (the dev extra) is not installed")
        if hazard := gdb_call_hazard():
            pytest.skip(f"watch --heap refuses to attach here (test_ci_heap checks it): {hazard}")
        script = tmp_path / "target.py"
        script.write_text(PYTHON_TARGET)
        target = spawn([sys.executable, script])
    else:
        target = spawn([leakers / "pool_leaker", "--rate", "2M", "--chunk", "64K", "--churn", "10"])
    time.sleep(0.3)
    fds, threads = _fds(target.pid), _status(target.pid)["Threads"]
    bpf_before, uprobes_before = _bpf_holders(), _uprobes()
    argv = [a.replace("{pid}", str(target.pid)).replace("{port}", str(_free_port())) for a in args]
    leakhunt = subprocess.Popen(
        [sys.executable, "-m", "leakhunt", *argv, "--json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    where = f"{name} killed {phase} at {at}s (LEAKHUNT_KILL_SEED={SEED})"
    time.sleep(at)
    try:
        children = psutil.Process(leakhunt.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    assert leakhunt.poll() is None, f"{where}: leakhunt exited on its own with {leakhunt.returncode}"
    leakhunt.kill()
    leakhunt.wait()

    deadline = time.monotonic() + SETTLE_S
    while True:
        status = _status(target.pid)
        left = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        clean = (
            status["State"][0] not in "tT"
            and status["TracerPid"] == "0"
            and status["Threads"] == threads
            and len(_fds(target.pid) ^ fds) <= (2 if kind == "python" else 0)
            and not left
            and _bpf_holders() <= bpf_before
            and _uprobes() == uprobes_before
        )
        if clean or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert target.alive(), f"{where}: the target died"
    assert status["State"][0] not in "tT", f"{where}: the target was left stopped ({status['State']})"
    assert status["TracerPid"] == "0", f"{where}: the target is still traced by {status['TracerPid']}"
    assert status["Threads"] == threads, f"{where}: threads {threads} -> {status['Threads']}"
    changed = _fds(target.pid) ^ fds
    if kind == "python":  # memray's extension keeps one pipe pair for every later tracker: its own
        changed -= {f for f in changed if "pipe:" in f} if len(changed) == 2 else set()
    assert not changed, f"{where}: open files changed: {sorted(changed)}"
    assert not left, f"{where}: left running: {[(c.pid, c.name()) for c in left]}"
    assert _bpf_holders() <= bpf_before, f"{where}: BPF programs held by {_bpf_holders() - bpf_before}"
    assert _uprobes() == uprobes_before, f"{where}: uprobes left: {_uprobes()}"
    for child in children:  # reap nothing of ours, but leave no stray process if the test failed
        if child.is_running():
            child.send_signal(signal.SIGKILL)
