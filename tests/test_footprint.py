"""What the kernel charges: shared objects held whole, the memory cgroup and /dev/shm.

The subjects are real processes whose RSS stays flat while they hold more and more shared
memory: a memfd filled through its descriptor, a POSIX segment written by a child and kept by
the parent, and a real torch DataLoader whose main loop keeps every batch.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import leakhunt_json, need, run_leakhunt

from leakhunt.proc.cgroup import CgroupReader, read_v2, time_to
from leakhunt.proc.shmem import ShmAccountant, true_orphans
from leakhunt.proc.smaps import read_smaps

MiB = 2**20
ROOT = Path(__file__).resolve().parents[1]


def _close(slope: float, rate: float, tolerance: float = 0.2) -> bool:
    return abs(slope - rate) <= tolerance * rate


def test_memfd_held_without_rss_is_a_leak(leakers, spawn):
    """4 MiB/s into memfds the process never touches: RSS flat, footprint at the rate, all deleted."""
    p = spawn([leakers / "memfd_leaker", "--rate", "4M", "--chunk", "256K"])
    doc = leakhunt_json("watch", "--pid", p.pid, "--duration", "10s", "--interval", "1s")
    assert doc["leak"], doc["verdict"]
    assert abs(doc["rss_bytes_end"] - doc["rss_bytes_start"]) < 1 * MiB
    assert _close(doc["footprint_slope_bytes_per_s"], 4 * MiB), doc["footprint_slope_bytes_per_s"]
    held = doc["held_shm"]
    assert held["objects"] >= 20 and held["deleted_objects"] == held["objects"]
    assert held["rss_bytes"] == 0 and held["bytes"] >= 20 * 256 * 1024
    assert held["top"][0]["pattern"] == "/memfd:lk_memfd"
    cg = doc["cgroup"]
    assert cg is not None and cg["version"] in (1, 2) and cg["usage_bytes"] > 0
    assert cg["stat"]["shmem"] >= held["bytes"]  # the kernel charges what we counted (and more)


def test_one_object_mapped_twice_counts_once(tmp_path):
    """Two mappings of one memfd, one touched page: the object's pages once, RSS's share apart."""
    fd = os.memfd_create("lk_twice")
    os.ftruncate(fd, 4 * MiB)
    os.pwrite(fd, b"x" * (2 * MiB), 0)  # 2 MiB allocated by the descriptor, not by a mapping
    a = mmap.mmap(fd, 4 * MiB)
    b = mmap.mmap(fd, 4 * MiB)
    a[0] = 1  # one page resident in this process
    try:
        held = ShmAccountant(os.getpid()).measure(read_smaps(os.getpid()))
        objects = [o for o in held.objects() if o.name == "/memfd:lk_twice"]
        assert len(objects) == 1
        o = objects[0]
        assert o.mappings == 2 and o.mapped == 8 * MiB and o.deleted
        assert o.bytes == 2 * MiB and o.size == 4 * MiB and 0 < o.rss <= 2 * 4096 * 2
        charged = held.charge(read_smaps(os.getpid()))
        rows = [i for i, path in enumerate(charged.path) if path.startswith("/memfd:lk_twice")]
        assert sum(int(charged.rss[i]) for i in rows) == 2 * MiB
    finally:
        a.close()
        b.close()
        os.close(fd)


def test_orphans_are_files_nobody_maps(tmp_path):
    """A /dev/shm file with no mapper is an orphan; one another process maps is not."""
    name = f"/dev/shm/lk_orphan_{os.getpid()}"
    kept = f"/dev/shm/lk_mapped_{os.getpid()}"
    for path in (name, kept):
        with open(path, "wb") as f:
            f.write(b"z" * MiB)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import mmap,sys;f=open({kept!r},'r+b');m=mmap.mmap(f.fileno(),0);print('ready');sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().startswith("ready")
        acc = ShmAccountant(os.getpid())
        held = true_orphans(acc.measure(read_smaps(os.getpid()), orphans=True))
        names = {o.name: o for o in held.orphans}
        assert f"/dev/shm/lk_orphan_{os.getpid()}" in names
        assert names[f"/dev/shm/lk_orphan_{os.getpid()}"].bytes == MiB
        assert f"/dev/shm/lk_mapped_{os.getpid()}" not in names
    finally:
        holder.kill()
        holder.wait()
        for path in (name, kept):
            os.unlink(path)


def test_cgroup_v1_or_v2_of_this_process():
    """Whatever this host runs, the reading is the kernel's: usage from the cgroup's own file."""
    reader = CgroupReader(os.getpid())
    reading = reader.read()
    need(reading is not None, f"no memory cgroup here: {reader.reason}")
    assert reading.usage_bytes > 0 and set(reading.stat) >= {"anon", "file", "shmem"}
    assert reading.path.startswith("/")


def test_cgroup_v2_files(tmp_path):
    """cgroup v2's files as the kernel writes them (this host mounts v1 for memory; clusters run v2):
    the smallest memory.max on the way up is the limit, memory.events gives the OOM kills."""
    root = tmp_path / "cg"
    leaf = root / "kubepods.slice" / "pod1" / "ctr"
    leaf.mkdir(parents=True)
    (root / "kubepods.slice" / "memory.max").write_text("8589934592\n")
    (root / "kubepods.slice" / "pod1" / "memory.max").write_text("1073741824\n")
    (leaf / "memory.max").write_text("max\n")
    (leaf / "memory.current").write_text("536870912\n")
    (leaf / "memory.stat").write_text("anon 100\nfile 300\nkernel 50\nshmem 200\nslab 40\n")
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n")
    r = read_v2(leaf, "/kubepods.slice/pod1/ctr", root)
    assert r.version == 2 and r.usage_bytes == 512 * MiB and r.limit_bytes == 1024 * MiB
    assert r.stat == {"anon": 100, "file": 300, "shmem": 200, "kernel": 50} and r.oom_kills == 1
    assert time_to(r.limit_bytes, r.usage_bytes, 1 * MiB) == 512.0
    assert time_to(None, r.usage_bytes, 1 * MiB) is None and time_to(r.limit_bytes, 0, 0.0) is None


def _v1_child_cgroup(limit: int) -> Path | None:
    reader = CgroupReader(os.getpid())
    if reader._where is None or reader._where[0] != 1:
        return None
    path = reader._where[1] / f"leakhunt-test-{os.getpid()}"
    try:
        path.mkdir()
        (path / "memory.limit_in_bytes").write_text(str(limit))
    except OSError:
        return None
    return path


def test_time_to_the_cgroup_limit(leakers, spawn):
    """A real memory cgroup with a 512 MiB limit: the leak's time to it, from the charge's slope."""
    cg = _v1_child_cgroup(512 * MiB)
    need(cg is not None, "needs root and a cgroup v1 memory hierarchy to make a cgroup in")
    p = spawn([leakers / "memfd_leaker", "--rate", "8M", "--chunk", "256K"])
    try:
        (cg / "cgroup.procs").write_text(str(p.pid))
        doc = leakhunt_json("watch", "--pid", p.pid, "--duration", "10s", "--interval", "1s")
        c = doc["cgroup"]
        assert c["path"].endswith(cg.name) and c["limit_bytes"] == 512 * MiB
        assert c["growing"] and _close(c["slope_bytes_per_s"], 8 * MiB, 0.3)
        expected = (512 * MiB - c["usage_bytes"]) / c["slope_bytes_per_s"]
        assert c["time_to_limit_s"] == pytest.approx(expected, rel=0.01)
        assert c["stat"]["shmem"] >= doc["held_shm"]["bytes"] * 0.9
    finally:
        p.stop()
        time.sleep(0.2)
        cg.rmdir()


def test_ci_gates_the_footprint(leakers, spawn):
    """RSS is flat; the footprint is what fails the gate."""
    p = spawn([leakers / "memfd_leaker", "--rate", "4M", "--chunk", "256K"])
    cp = run_leakhunt("ci", "--pid", p.pid, "--duration", "10s", "--interval", "1s", "--max-slope", "10M/min")
    assert cp.returncode == 1, cp.stderr + cp.stdout
    assert "footprint grows" in cp.stdout + cp.stderr


@pytest.mark.bpf
def test_investigate_names_memfds_held_untouched(leakers, spawn):
    """The process that creates, fills (through the descriptor) and holds: it is its own creator."""
    p = spawn([leakers / "memfd_leaker", "--rate", "4M", "--chunk", "256K"])
    doc = leakhunt_json("investigate", "--pid", p.pid, "--duration", "40s")
    assert doc["leak"] and doc["explained_fraction"] >= 0.8, doc["verdict"]
    top = doc["culprits"][0]
    assert top["class"] == "shm" and top["known"]["id"] == "leakhunt-fixture-memfd"
    assert top["created_by"][0]["pid"] == p.pid and top["created_by"][0]["origin"] == "memfd_leaker!main"
    assert "created by itself" in doc["verdict"]


@pytest.mark.bpf
def test_investigate_names_the_object_the_parent_holds(leakers, spawn):
    """A child writes, the parent keeps: the parent's traced mmaps of the deleted segments."""
    p = spawn([leakers / "shm_handoff", "--rate", "4M", "--chunk", "256K"])
    doc = leakhunt_json("investigate", "--pid", p.pid, "--duration", "40s")
    assert doc["leak"] and doc["explained_fraction"] >= 0.8, doc["verdict"]
    top = doc["culprits"][0]
    assert top["class"] == "shm" and top["known"]["id"] == "leakhunt-fixture-handoff"
    assert "lk_handoff_" in top["detail"] and "all deleted" in top["detail"]
    assert abs(doc["rss_slope_bytes_per_s"]) < 0.1 * MiB
    # the writer is the child: its shm_open, from its main, found host-wide
    child = int(open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()[0])
    creator = top["created_by"][0]
    assert creator["pid"] == child and creator["origin"] == "shm_handoff!main", creator
    # sizes come from the creator's ftruncate, which may land after the last creation was read
    assert creator["objects"] >= 10 and creator["bytes"] >= (creator["objects"] - 2) * 256 * 1024
    assert f"created by pid {child}" in doc["verdict"]


@pytest.mark.bpf
def test_torch_dataloader_batches_kept_in_shared_memory(spawn):
    """The incident: a real DataLoader, the main loop keeping every batch. investigate on the
    main process names torch's shared-memory hand-off and explains the footprint's growth."""
    pytest.importorskip("torch")
    p = spawn(
        [sys.executable, ROOT / "fixtures/torch/dataloader_keeper.py", "--rate", "4M", "--batch", "256K"],
        timeout=120,
    )
    doc = leakhunt_json("investigate", "--pid", p.pid, "--duration", "45s", timeout=200)
    assert doc["leak"] and doc["explained_fraction"] >= 0.8, doc["verdict"]
    top = doc["culprits"][0]
    assert top["class"] == "shm" and top["known"]["id"] == "torch-shared-fd", top
    assert top["library"].startswith("libtorch") or "libtorch" in " ".join(top["stack"])
    assert doc["held_shm"]["deleted_objects"] >= 20
    workers = {int(x) for x in open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()}
    creators = top["created_by"]
    assert creators and {c["pid"] for c in creators} <= workers, (creators, workers)  # the workers made them
    assert all("libtorch" in c["origin"] and "shm_open" in " ".join(c["stack"]) for c in creators)
    assert doc["rss_slope_bytes_per_s"] < 0.25 * doc["footprint_slope_bytes_per_s"]
