"""Tracing a target in a container: its own mount, pid and IPC namespaces, a root of its own, its
library at a path only it has (/app/libleakpool.so, fixtures/leakers/contained.sh). Every tracer
must name that library and the leaking function as it does on the host, from the host pid."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import LEAKERS_SRC, leakhunt_json, need, run_leakhunt

from leakhunt.proc.classes import RegionClass
from leakhunt.proc.smaps import read_smaps
from leakhunt.proc.target import open_target
from leakhunt.trace.kernel_backend import _shm_length
from leakhunt.trace.symbols import ModuleCache

CONTAINED = LEAKERS_SRC / "contained.sh"
APP_LIBRARY = "/app/libleakpool.so"
POOL_CHAIN = ["lkpool_grow", "lkpool_mpool_get", "lkpool_event_dispatch", "lkpool_release"]
POOL_ARGS = ["--rate", "4M", "--chunk", "1M", "--churn", "20"]


@dataclass(frozen=True)
class Contained:
    pid: int  # on the host: what leakhunt is given
    inner_pid: int  # inside its pid namespace (what the leaker itself printed)
    unshare: subprocess.Popen


@contextmanager
def contained(leakers: Path, program: str, *args: str):
    """Run a leaker in namespaces of its own (contained.sh); always stopped afterwards."""
    need(os.geteuid() == 0, "needs root to create mount and pid namespaces")
    need(all(shutil.which(t) for t in ("unshare", "pivot_root")), "needs util-linux's unshare and pivot_root")
    popen = subprocess.Popen(
        [str(CONTAINED), str(leakers), program, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    host_pid = None
    try:
        line = popen.stdout.readline()
        assert line.startswith("ready"), f"contained.sh: {popen.stderr.read()}"
        host_pid = int(Path(f"/proc/{popen.pid}/task/{popen.pid}/children").read_text().split()[0])
        yield Contained(host_pid, int(line.split()[1]), popen)
    finally:
        # unshare blocks SIGTERM while it waits: stop the leaker itself (its handler exits cleanly).
        if host_pid is not None:
            try:
                os.kill(host_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            popen.kill()  # --kill-child takes the leaker with it
            popen.wait()


@pytest.fixture(scope="module")
def pool(leakers):
    with contained(leakers, "pool_leaker", *POOL_ARGS) as target:
        yield target


def _pool_caller(doc: dict) -> dict:
    top = doc["by_caller"][0]
    assert (top["library"], top["symbol"]) == ("libleakpool.so", "lkpool_grow"), doc["by_caller"][:3]
    return top


def test_the_target_lives_in_namespaces_of_its_own(pool):
    target = open_target(pool.pid)
    assert target.nspid == (pool.pid, pool.inner_pid) and pool.inner_pid == 1
    assert os.stat(f"/proc/{pool.pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
    assert APP_LIBRARY in Path(f"/proc/{pool.pid}/maps").read_text()
    assert not os.path.exists(APP_LIBRARY)  # not on the host...
    assert os.path.exists(f"/proc/{pool.pid}/root{APP_LIBRARY}")  # ...only inside
    assert f"pid {pool.pid} (" in target.describe() and "pid 1 inside" in target.describe()


@pytest.mark.bpf
@pytest.mark.parametrize("backend", ["bcc", "bpftrace"])
def test_bpf_backends_name_a_library_only_the_container_has(pool, backend, tmp_path):
    doc = leakhunt_json(
        "trace-mmap",
        "--pid",
        pool.pid,
        "--backend",
        backend,
        "--duration",
        "4s",
        "--record",
        tmp_path / "rec",
    )
    assert doc["backend"] == backend and doc["lost_events"] == 0
    assert (doc["pid"], doc["nspid"]) == (pool.pid, [pool.pid, 1])
    top = _pool_caller(doc)
    assert top["outstanding_bytes"] >= 2 * 2**20 and top["unmapped_bytes"] == 0
    assert [s.split("!")[1].split("+")[0] for s in top["stack"][1:5]] == POOL_CHAIN
    # The probes filter on the host pid (bpf_get_current_pid_tgid): the addresses they return are
    # the target's, each inside an anonymous region of its own smaps, resident.
    smaps = read_smaps(pool.pid)
    held = [json.loads(line) for line in (tmp_path / "rec" / "outstanding.jsonl").read_text().splitlines()]
    grown = [o for o in held if o["caller"] and "lkpool_grow" in o["caller"]]
    assert grown and all(o["pid"] == pool.pid for o in grown)
    for o in grown:
        i = int(smaps.start.searchsorted(o["start"], side="right")) - 1
        assert i >= 0 and o["end"] <= int(smaps.end[i]), hex(o["start"])
        assert smaps[i].klass is RegionClass.ANON and int(smaps.rss[i]) > 0


@pytest.mark.gdb
def test_gdb_reads_the_container_through_its_root_as_sysroot(pool):
    doc = leakhunt_json("trace-mmap", "--pid", pool.pid, "--backend", "gdb", "--duration", "4s")
    details = doc["backend_details"]
    assert details["sysroot"] == f"/proc/{pool.pid}/root"  # gdb's own answer to `show sysroot`
    assert details["unread_libraries"] == []  # /app/libleakpool.so included
    assert details["detached"] and details["tracer_after"] == 0
    top = _pool_caller(doc)
    # Function names come from gdb's unwinder: it read /app/libleakpool.so through the sysroot.
    assert [s.split("!")[1].split("+")[0] for s in top["stack"][1:5]] == POOL_CHAIN
    assert top["outstanding_bytes"] > 0


def test_the_host_copy_of_a_library_path_is_not_taken_for_the_target_s():
    """When a module can be read neither through map_files nor through the target's root, our own
    view of its path is used only if it is the very file mapped: in a container that path may hold
    another build of the library, whose symbols would name the wrong code."""
    libc = next(
        p
        for p in (
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/lib64/libc.so.6",
        )
        if os.path.exists(p)
    )
    inode = os.stat(libc).st_ino
    cache = ModuleCache()
    assert cache.open([], Path("/"), libc, fallback=(libc, inode + 1)) is None
    assert cache.open(["/nonexistent/libc.so.6"], Path("/"), libc, fallback=(libc, inode)) is not None


def test_system_v_sizes_are_not_read_from_another_ipc_namespace(pool):
    """/proc/sysvipc lists our IPC namespace's segments: the same shmid in a container is another
    segment, so a shmat there must not take its size from ours."""
    libc = ctypes.CDLL(None, use_errno=True)
    shmid = libc.shmget(0, 5 * 4096, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    try:
        assert _shm_length(os.getpid(), 0, shmid) == 5 * 4096  # ours: found by its id
        assert _shm_length(pool.pid, 0, shmid) == 0  # the container's: unknown, not ours
    finally:
        libc.shmctl(shmid, 0, None)  # IPC_RMID


def test_bpf_backends_refuse_to_run_inside_a_pid_namespace(leakers):
    """From a container's own /proc every pid is another number to the kernel: the probes would see
    nothing. The BPF backends say so in one line; gdb (ptrace) still works from there."""
    need(os.geteuid() == 0 and shutil.which("unshare") is not None, "needs root and unshare")
    script = (
        f"{leakers}/steady --rate 1M --chunk 256K >/dev/null & "
        f"{sys.executable} -m leakhunt trace-mmap --pid $! --backend bpftrace --duration 1s; "
        f"echo rc=$?; kill $!"
    )
    cp = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "rc=2" in cp.stdout, cp.stderr
    error = cp.stderr.strip().splitlines()
    assert len(error) == 1 and "pid namespace" in error[0] and "--backend gdb" in error[0], cp.stderr
    assert "Traceback" not in cp.stderr


def test_human_output_names_the_host_pid_and_the_pid_inside(pool):
    cp = run_leakhunt("watch", "--pid", pool.pid, "--duration", "1s", "--interval", "0.5s")
    assert cp.returncode == 0, cp.stderr
    text = " ".join((cp.stdout + cp.stderr).split())  # rich wraps long lines
    assert f"pid {pool.pid} (/app/pool_leaker" in text and "; pid 1 inside)" in text
