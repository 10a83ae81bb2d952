"""The gdb backend never leaves its target stopped, traced or crashed: whatever dies first
(leakhunt, gdb, the target), threads and children coming and going, a tracer already there."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from test_gdb_support import alive, collect, makes_progress, tracer, wait_untraced

import leakhunt.gdb.session as session_module
from leakhunt.errors import AccessDenied
from leakhunt.gdb.backend import GdbBackend, gdb_extra
from leakhunt.gdb.guard import INT3
from leakhunt.gdb.preflight import TraceAccess
from leakhunt.proc.target import open_target, read_memory
from leakhunt.trace.backend import TraceOptions

pytestmark = pytest.mark.gdb

# A leakhunt that traces until it is killed; with "fork", a child keeps every pipe to gdb open so
# that gdb's input never closes and only the gdb-side watchdog can tell that leakhunt died.
DRIVER = textwrap.dedent("""\
    import os, sys, time
    from leakhunt.proc.target import open_target
    from leakhunt.trace.backend import TraceOptions
    from leakhunt.gdb.backend import GdbBackend, gdb_extra
    backend = GdbBackend(open_target(int(sys.argv[1])), TraceOptions(extra=gdb_extra(max_hits=10**6)))
    backend.start()
    child = os.fork() if sys.argv[2] == "fork" else -1
    if child == 0:
        time.sleep(120)
        os._exit(0)
    events = 0
    while True:
        events += len(backend.poll(0.2))
        print(events, backend._session.mi.pid, child, flush=True)
""")


def _driver_with_events(pid: int, mode: str) -> tuple[subprocess.Popen, int, int]:
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(pid), mode], stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = driver.stdout.readline()
        assert line, "the driver exited before collecting events"
        events, gdb, child = map(int, line.split())
        if events >= 5:
            return driver, gdb, child
    driver.kill()
    raise AssertionError("no events within 60s")


@pytest.mark.parametrize("mode", ["plain", "fork"], ids=["pipes-close", "pipes-held-open"])
def test_sigkill_of_leakhunt_leaves_the_target_running_untraced(spawn, leakers, mode):
    proc = spawn([leakers / "pool_leaker", "--rate", "4M", "--chunk", "1M", "--churn", "20"])
    driver, gdb, child = _driver_with_events(proc.pid, mode)
    try:
        assert tracer(proc.pid) == gdb
        driver.kill()
        driver.wait()
        assert wait_untraced(proc.pid) == 0
        assert makes_progress(proc.pid, 2.0) and alive(proc.pid)
        deadline = time.monotonic() + 10
        while alive(gdb) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(gdb), "gdb should quit once it detached"
    finally:
        if child > 0 and alive(child):
            os.kill(child, signal.SIGKILL)


def test_target_killed_mid_session_keeps_what_was_collected(spawn, leakers):
    proc = spawn([leakers / "pool_leaker", "--rate", "4M", "--chunk", "1M", "--churn", "20"])
    backend = GdbBackend(open_target(proc.pid), TraceOptions(extra=gdb_extra(max_hits=10**6)))
    with backend:
        events = collect(backend, timeout=60, until=lambda ev: len(ev) >= 5)
        proc.popen.kill()
        events += collect(backend, timeout=30)
        assert backend.finished == "target exited (killed by SIGKILL)"
        assert backend.target_exited
    assert len(events) >= 5 and backend.stats.events == len(events)
    assert not alive(backend._session.mi.pid)


def test_gdb_killed_mid_session_leaves_no_breakpoint_behind(spawn, leakers):
    proc = spawn([leakers / "pool_leaker", "--rate", "4M", "--chunk", "1M"])
    backend = GdbBackend(open_target(proc.pid), TraceOptions(extra=gdb_extra(max_hits=10**6)))
    with backend:
        collect(backend, timeout=60, until=lambda ev: len(ev) >= 5)
        # Kill gdb while the target sleeps between ticks: a thread stopped at a breakpoint when gdb
        # dies, or a few instructions before one, runs onto the int3 before anybody can put the
        # code back (the guard's known limit); one that sleeps wakes up to restored code.
        _wait_all_sleeping(proc.pid)
        os.kill(backend._session.mi.pid, signal.SIGKILL)
        collect(backend, timeout=30)
        assert "gdb was killed by signal 9" in backend.finished
    assert backend.details()["restored_sites"] >= 2, (backend.details(), backend.stats.notes)
    sites = backend._session.sites.values()
    assert all(read_memory(proc.pid, s.address, 1) != bytes([INT3]) for s in sites)
    assert tracer(proc.pid) == 0
    # It keeps calling syscall(SYS_mmap) and munmap(), where gdb had broken: an int3 left behind
    # would kill it with SIGTRAP.
    assert makes_progress(proc.pid, 2.0) and proc.alive()


def _wait_all_sleeping(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = {
            open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[0]
            for t in os.listdir(f"/proc/{pid}/task")
        }
        if states == {"S"}:
            return
        time.sleep(0.001)


def test_stop_while_hits_are_in_flight_detaches_cleanly(spawn, leakers):
    proc = spawn([leakers / "steady", "--rate", "64M", "--chunk", "64K"])  # ~1000 mmap+munmap/s offered
    backend = GdbBackend(open_target(proc.pid), TraceOptions(extra=gdb_extra(max_hits=10**6)))
    with backend:
        collect(backend, timeout=60, until=lambda ev: len(ev) >= 50)
    details = backend.details()
    assert details["detached"] and details["restored_sites"] == 0
    assert tracer(proc.pid) == 0 and makes_progress(proc.pid) and proc.alive()


def test_a_process_already_traced_is_refused_in_one_line(spawn, leakers):
    proc = spawn([leakers / "steady", "--rate", "1M"])
    strace = subprocess.Popen(["strace", "-p", str(proc.pid), "-o", os.devnull], stderr=subprocess.DEVNULL)
    try:
        assert _wait_traced(proc.pid)
        with pytest.raises(AccessDenied) as refused:
            GdbBackend(open_target(proc.pid), TraceOptions()).start()
        message = str(refused.value)
        assert f"already traced by pid {strace.pid} (strace)" in message and "\n" not in message
    finally:
        strace.terminate()
        strace.wait()
    assert wait_untraced(proc.pid) == 0 and proc.alive()


def test_gdb_refusing_to_attach_is_one_line_and_leaves_nothing(spawn, leakers, monkeypatch):
    """The race past our own checks: another tracer attaches between them and gdb's attach."""
    proc = spawn([leakers / "steady", "--rate", "1M"])
    monkeypatch.setattr(
        session_module, "check_access", lambda target, gdb: TraceAccess(shutil.which(gdb), False)
    )
    strace = subprocess.Popen(["strace", "-p", str(proc.pid), "-o", os.devnull], stderr=subprocess.DEVNULL)
    try:
        assert _wait_traced(proc.pid)
        backend = GdbBackend(open_target(proc.pid), TraceOptions())
        with pytest.raises(AccessDenied) as refused:
            backend.start()
        assert f"already traced by pid {strace.pid} (strace)" in str(refused.value)
        assert backend._session.notes == [] and not alive(backend._session.mi.pid)
    finally:
        strace.terminate()
        strace.wait()
    assert wait_untraced(proc.pid) == 0 and proc.alive()


def _wait_traced(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while not tracer(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return tracer(pid) != 0


EXECER = textwrap.dedent("""\
    import mmap, os, sys, time
    print("ready", flush=True)
    sys.stdin.readline()                 # the test says when it is attached
    keep = [mmap.mmap(-1, 1 << 20) for _ in range(5)]
    os.execv("/bin/sleep", ["sleep", "30"])
""")


def test_an_exec_ends_the_session_and_the_new_program_runs_untraced(spawn):
    proc = spawn([sys.executable, "-c", EXECER], stdin=subprocess.PIPE)
    backend = GdbBackend(
        open_target(proc.pid), TraceOptions(extra=gdb_extra(max_hits=10**6, python_frames=False))
    )
    with backend:
        proc.popen.stdin.write("go\n")
        proc.popen.stdin.flush()
        events = collect(backend, timeout=60)
        assert backend.finished == "the target called exec"
    assert len([e for e in events if e.length == 1 << 20]) == 5
    assert wait_untraced(proc.pid) == 0
    assert open(f"/proc/{proc.pid}/comm").read().strip() == "sleep" and proc.alive()


CHURNER = r"""
/* Threads that come and go, each mapping memory through syscall() and mmap(), and a fork per
 * round whose child maps memory too: it inherits the parent's code, which gdb must have cleaned
 * of breakpoints, or it dies of SIGTRAP. Exits 3 if any child did not exit 0. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void *worker(void *arg) {
    for (int i = 0; i < 3; i++) {
        void *p = (void *)syscall(SYS_mmap, NULL, 1 << 16, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        void *q = mmap(NULL, 1 << 16, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        munmap(q, 1 << 16);
        munmap(p, 1 << 16);
        usleep(2000);
    }
    return arg;
}

int main(int argc, char **argv) {
    int rounds = atoi(argv[1]), bad = 0;
    printf("ready %d\n", getpid());
    fflush(stdout);
    char go[8];
    if (!fgets(go, sizeof go, stdin)) return 2;  /* the test says when it is attached */
    for (int r = 0; r < rounds; r++) {
        pthread_t t[4];
        for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, worker, NULL);
        for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
        pid_t child = fork();
        if (child == 0) {
            munmap((void *)syscall(SYS_mmap, NULL, 1 << 16, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), 1 << 16);
            _exit(0);
        }
        int status = 0;
        waitpid(child, &status, 0);
        bad += !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    }
    return bad ? 3 : 0;
}
"""


def test_threads_and_children_that_come_and_go(spawn, tmp_path):
    source = tmp_path / "churner.c"
    source.write_text(CHURNER)
    subprocess.run(["cc", "-O2", "-pthread", "-o", tmp_path / "churner", source], check=True)
    proc = spawn([tmp_path / "churner", "15"], stdin=subprocess.PIPE)
    backend = GdbBackend(open_target(proc.pid), TraceOptions(extra=gdb_extra(max_hits=10**6)))
    with backend:
        proc.popen.stdin.write("go\n")
        proc.popen.stdin.flush()
        events = collect(backend, timeout=120)
        assert backend.finished == "target exited (exit status 0)"  # every forked child exited 0
    threads = {e.tid for e in events}
    assert len(threads) > 4 and proc.pid in threads  # short-lived worker threads were traced
    assert backend.stats.lost_events == 0
    workers = [e for e in events if e.kind.value == "mmap" and e.caller and e.caller.symbol == "worker"]
    assert len(workers) == 15 * 4 * 3 * 2  # every worker mapping, through syscall() and mmap()
