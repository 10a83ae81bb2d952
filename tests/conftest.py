"""Shared fixtures: build the C leakers, start real processes and always clean them up, run the
real CLI, and decide whether root/BPF/gdb tests skip (laptop) or fail (CI: LEAKHUNT_REQUIRE_BPF=1)."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEAKERS_SRC = ROOT / "fixtures" / "leakers"
REQUIRE_BPF = os.environ.get("LEAKHUNT_REQUIRE_BPF") == "1"
SHARED_DATA = ROOT / "tests" / "data"  # a copy of ../shared/data: CI clones the repository alone


def need(ok: bool, reason: str) -> None:
    """Skip when a prerequisite is missing, or fail when CI demands it (LEAKHUNT_REQUIRE_BPF=1)."""
    if ok:
        return
    if REQUIRE_BPF:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def have_root() -> bool:
    return os.geteuid() == 0


def have_tracefs() -> bool:
    return os.path.isdir("/sys/kernel/tracing/events/syscalls")


def require_bpf() -> None:
    need(have_root(), "needs root for BPF")
    need(have_tracefs(), "needs tracefs with syscall tracepoints (leakhunt doctor --install)")
    need(shutil.which("bpftrace") is not None, "needs bpftrace (leakhunt doctor --install)")


def require_gdb() -> None:
    need(shutil.which("gdb") is not None, "needs gdb (leakhunt doctor --install)")
    need(have_root() or _ptrace_scope() == 0, "needs ptrace permission (root or ptrace_scope=0)")


def _ptrace_scope() -> int:
    try:
        return int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except (OSError, ValueError):
        return 0


def gdb_call_hazard() -> str | None:
    """Why gdb cannot call a function inside a process on this machine (None: it can)."""
    from leakhunt.gdb.preflight import gdb_call_hazard

    return gdb_call_hazard("gdb") if shutil.which("gdb") else None


@pytest.fixture(autouse=True)
def _requirements(request):
    if request.node.get_closest_marker("bpf"):
        require_bpf()
    if request.node.get_closest_marker("gdb"):
        require_gdb()
    if request.node.get_closest_marker("gdb_calls") and (hazard := gdb_call_hazard()):
        # Not something an install fixes: the CPU, the kernel and gdb disagree. Where this skips,
        # test_ci_heap's refusal test runs instead and holds leakhunt to refusing the attach.
        pytest.skip(f"gdb cannot call into a process here, so memray cannot attach: {hazard}")


@pytest.fixture(scope="session")
def leakers() -> Path:
    """Directory of the built leakers (make -C fixtures/leakers), built once per run."""
    need(shutil.which("cc") is not None, "needs a C compiler (cc)")
    out = LEAKERS_SRC / "build"
    subprocess.run(["make", "-s", "-C", str(LEAKERS_SRC), f"OUT={out}"], check=True)
    return out


@dataclass
class Proc:
    popen: subprocess.Popen
    argv: list[str]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


@pytest.fixture
def spawn():
    """Start a real process that prints a line starting with 'ready' when set up; always cleaned up.

    spawn(argv, ready="ready", env=None, timeout=30) -> Proc
    """
    procs: list[Proc] = []

    def start(argv, ready: str | None = "ready", env=None, timeout: float = 30, **kw) -> Proc:
        popen = subprocess.Popen(
            [str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw
        )
        proc = Proc(popen, [str(a) for a in argv])
        procs.append(proc)
        if ready is not None:
            deadline = time.monotonic() + timeout
            while True:
                line = popen.stdout.readline()
                if line.startswith(ready):
                    break
                if not line and popen.poll() is not None:
                    raise RuntimeError(f"{argv[0]} exited with {popen.returncode}: {popen.stderr.read()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} not ready after {timeout}s")
        return proc

    yield start
    for proc in procs:
        proc.stop()
        for path in glob.glob(f"/dev/shm/lk_shm_{proc.pid}_*"):
            os.unlink(path)


def run_leakhunt(*args, timeout: float = 300, check: bool = False, env=None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (python -m leakhunt), as a user would."""
    cp = subprocess.run(
        [sys.executable, "-m", "leakhunt", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check and cp.returncode != 0:
        raise AssertionError(f"leakhunt {' '.join(map(str, args))} exited {cp.returncode}:\n{cp.stderr}")
    return cp


def leakhunt_json(*args, **kw) -> dict:
    """Run the CLI with --json and parse its one JSON document."""
    cp = run_leakhunt(*args, "--json", **kw)
    assert cp.returncode in (0, 1), f"exit {cp.returncode}: {cp.stderr}"
    return json.loads(cp.stdout)


def read_markdown(path) -> str:
    """A Markdown file as a reader sees it: the backslash escapes leakhunt puts before anything
    Markdown would read as syntax (text from the target is data) taken away."""
    return re.sub(r"\\([\\`*_\[\]<>|#~])", r"\1", Path(path).read_text())


def start_tracing(*args, timeout: float = 120) -> subprocess.Popen:
    """`leakhunt trace-mmap ARGS` in the background, returned once it says it is tracing (the
    line goes to stderr with --json, to stdout without): from there on every call is seen."""
    argv = [sys.executable, "-m", "leakhunt", "trace-mmap", *(str(a) for a in args)]
    tracer = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stream = tracer.stderr if "--json" in argv else tracer.stdout
    deadline = time.monotonic() + timeout
    while "tracing pid" not in stream.readline():
        assert tracer.poll() is None and time.monotonic() < deadline, "trace-mmap did not attach"
    return tracer
