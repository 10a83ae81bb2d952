"""The gdb backend on real processes: full stacks of the leaking library, returned addresses that
land in the anonymous memory that grew, budgets, sampling, thresholds, and Python frames."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import need
from test_gdb_support import collect, makes_progress, tracer

from leakhunt.gdb.backend import GdbBackend, gdb_extra
from leakhunt.proc.classes import RegionClass
from leakhunt.proc.growth import held_between, range_growth
from leakhunt.proc.smaps import read_smaps
from leakhunt.proc.target import open_target
from leakhunt.trace.backend import TraceOptions
from leakhunt.trace.events import EventKind

pytestmark = pytest.mark.gdb

POOL_CHAIN = ["lkpool_grow", "lkpool_mpool_get", "lkpool_event_dispatch", "lkpool_release"]


@pytest.fixture(scope="module")
def pool_session(leakers):
    """One session on pool_leaker: smaps before, 40 hits, smaps after; the target keeps running."""
    proc = subprocess.Popen(
        [leakers / "pool_leaker", "--rate", "8M", "--chunk", "1M", "--churn", "5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("ready")
        target = open_target(proc.pid)
        before = read_smaps(proc.pid)
        backend = GdbBackend(target, TraceOptions(extra=gdb_extra(max_hits=40)))
        with backend:
            events = collect(backend, timeout=60)
        after = read_smaps(proc.pid)
        yield {"proc": proc, "events": events, "before": before, "after": after, "backend": backend}
    finally:
        proc.kill()
        proc.wait()


def _pool_grows(events):
    return [e for e in events if e.kind is EventKind.MMAP and e.caller and e.caller.symbol == "lkpool_grow"]


def test_stacks_name_the_leaking_library_chain(pool_session):
    grows = _pool_grows(pool_session["events"])
    assert grows, "no mmap from lkpool_grow among " + str([str(e.caller) for e in pool_session["events"]])
    for event in grows:
        symbols = [f.symbol for f in event.stack.frames]
        assert symbols[0] == "syscall"
        assert symbols[1:5] == POOL_CHAIN
        assert event.stack.source == "gdb"
        assert all(f.library == "libleakpool.so" for f in event.stack.frames[1:5])


def test_caller_is_the_first_frame_past_the_syscall_wrapper(pool_session):
    assert _pool_grows(pool_session["events"])
    for event in _pool_grows(pool_session["events"]):
        assert event.caller == event.stack.frames[1]
        assert event.caller.library == "libleakpool.so" and event.caller.offset > 0


def test_returned_addresses_fall_in_anonymous_regions_that_grew(pool_session):
    before, after = pool_session["before"], pool_session["after"]
    grows = _pool_grows(pool_session["events"])
    assert grows
    lo = np.array([e.ret for e in grows], dtype=np.uint64)
    hi = lo + np.array([e.length for e in grows], dtype=np.uint64)
    gained = held_between(after, lo, hi) - held_between(before, lo, hi)
    assert (gained > 0).all(), f"returned ranges that did not grow: {[hex(int(x)) for x in lo[gained <= 0]]}"
    growth = range_growth(before, after)
    grew = [i for i in range(len(after)) if growth.growth[i] > 0]
    for event in grows:
        region = next(i for i in range(len(after)) if after.start[i] <= event.ret < after.end[i])
        assert after[region].klass is RegionClass.ANON
        assert region in grew


def test_events_carry_arguments_and_results(pool_session):
    events = pool_session["events"]
    maps = [e for e in events if e.kind is EventKind.MMAP]
    unmaps = [e for e in events if e.kind is EventKind.MUNMAP]
    assert maps and unmaps
    pid = pool_session["proc"].pid
    for e in maps:
        assert e.pid == pid and e.tid == pid and e.ret > 0 and e.length > 0
        assert e.prot == 3 and e.flags & 0x20 and e.fd == -1  # RW, MAP_ANONYMOUS
    for e in unmaps:
        assert e.ret == 0 and e.addr and e.stack is None  # releases carry no stack
        assert e.caller is not None and e.caller.symbol  # but name their caller
    unmapped = {e.addr for e in unmaps}
    assert unmapped & {e.ret for e in maps}  # the churn: mapped then unmapped


def test_hit_budget_ends_the_session_detached_and_the_target_runs_on(pool_session):
    backend, proc = pool_session["backend"], pool_session["proc"]
    assert len(pool_session["events"]) == 40
    assert "hit budget" in backend.finished
    details = backend.details()
    assert details["detached"] and details["tracer_after"] == 0 and details["lost"] == 0
    assert details["cost"]["hits"] == 40 and details["cost"]["stopped_s"] > 0
    assert tracer(proc.pid) == 0 and makes_progress(proc.pid)


def test_time_budget_ends_the_session(spawn, leakers):
    proc = spawn([leakers / "steady", "--rate", "1M", "--chunk", "64K"])
    backend = GdbBackend(open_target(proc.pid), TraceOptions(extra=gdb_extra(time_budget=1.0)))
    with backend:
        events = collect(backend, timeout=30)
    assert "time budget" in backend.finished
    assert events and backend.details()["detached"]
    assert tracer(proc.pid) == 0 and proc.alive()


def test_every_nth_hit_is_sampled_through_ignore_counts(spawn, leakers):
    proc = spawn([leakers / "steady", "--rate", "4M", "--chunk", "256K"])
    options = TraceOptions(kinds=frozenset({EventKind.MMAP}), extra=gdb_extra(every=3, time_budget=2.0))
    backend = GdbBackend(open_target(proc.pid), options)
    with backend:
        events = collect(backend, timeout=30)
    seen = backend.details()["seen"]
    assert len(events) >= 3
    # gdb skipped 2 hits after each one taken; a hit that arrives as the time budget ends is
    # counted as seen but never becomes an event.
    assert 3 * len(events) - 2 <= seen <= 3 * len(events) + 1
    assert backend.stats.filtered == seen - len(events)


def test_length_threshold_keeps_small_calls_out(spawn, leakers):
    proc = spawn([leakers / "pool_leaker", "--rate", "4M", "--chunk", "1M", "--churn", "20"])
    options = TraceOptions(min_length=512 << 10, extra=gdb_extra(max_hits=12))
    backend = GdbBackend(open_target(proc.pid), options)
    with backend:
        events = collect(backend, timeout=60)
    assert len(events) == 12
    assert all(e.length >= 512 << 10 for e in events)  # the 64 KiB buffers never stopped the target


SCRIPT = textwrap.dedent("""\
    import mmap, sys, threading, time
    keep = []
    class Pool:
        def grow(self, n):
            keep.append(mmap.mmap(-1, n))   # GROW_LINE
    def serve():
        pool = Pool()
        while True:
            pool.grow(1 << 20)
            time.sleep(0.05)
    threading.Thread(target=serve, name="server", daemon=True).start()
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("python", [sys.executable, "python3.12", "python3.13"])
def test_python_frames_name_the_python_function_and_line(spawn, tmp_path, python):
    """CPython 3.11 to 3.13 lay out their frames differently; the reader knows all three."""
    interpreter = _interpreter(python)
    if interpreter is None:
        pytest.skip(f"no {python} here")
    script = tmp_path / "pyserver.py"
    script.write_text(SCRIPT)
    grow_line = (
        SCRIPT.splitlines().index(next(line for line in SCRIPT.splitlines() if "GROW_LINE" in line)) + 1
    )
    proc = spawn([interpreter, script])
    backend = GdbBackend(
        open_target(proc.pid), TraceOptions(kinds=frozenset({EventKind.MMAP}), extra=gdb_extra(max_hits=3))
    )
    with backend:
        events = collect(backend, timeout=60)
    if "Python frames unavailable" in " ".join(backend.stats.notes):
        pytest.skip("this Python has no debug info: " + " ".join(backend.stats.notes))
    python = [f for e in events for f in e.stack.frames if f.address == 0]
    grow = [f for f in python if f.symbol == "Pool.grow"]
    assert grow, f"no Pool.grow frame in {[str(e.stack) for e in events]}"
    assert grow[0].module == str(script) and grow[0].offset == grow_line
    assert "serve" in [f.symbol for f in python]
    frames = events[0].stack.frames
    eval_at = max(
        i
        for i, f in enumerate(frames)
        if f.symbol == "_PyEval_EvalFrameDefault" and i < frames.index(grow[0])
    )
    assert frames[eval_at + 1].address == 0  # Python frames follow the C frame that runs them


def test_a_target_in_another_mount_namespace_is_read_through_its_root(leakers, tmp_path):
    """A container's files are not ours: here the leaker and its library exist only on a tmpfs
    mounted in the target's own mount namespace; gdb must read them through /proc/PID/root."""
    need(os.geteuid() == 0 and shutil.which("unshare") is not None, "needs root and unshare")
    hidden = tmp_path / "ns"
    hidden.mkdir()
    script = (
        f"mount -t tmpfs none {hidden} && cp {leakers}/pool_leaker {leakers}/libleakpool.so {hidden}/ && "
        f"exec {hidden}/pool_leaker --rate 4M --chunk 1M"
    )
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("ready")
        assert not (hidden / "pool_leaker").exists()  # not in our namespace
        backend = GdbBackend(open_target(proc.pid), TraceOptions(extra=gdb_extra(max_hits=12)))
        with backend:
            events = collect(backend, timeout=60)
        grows = _pool_grows(events)
        assert grows and grows[0].caller.module == f"{hidden}/libleakpool.so"
        assert [f.symbol for f in grows[0].stack.frames[1:5]] == POOL_CHAIN
        assert tracer(proc.pid) == 0 and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def _interpreter(name: str) -> str | None:
    """``name`` as a working interpreter: on PATH, or installed beside ours (pyenv, uv)."""
    siblings = sorted(Path(sys.base_prefix).parent.glob(f"*/bin/{Path(name).name}"))
    for candidate in [name if os.path.isabs(name) else shutil.which(name), *map(str, siblings)]:
        if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    return None
