"""`leakhunt top`: the leakers found among a crowd of steady processes, with no pid given.

200 real steady processes (mapping, touching and unmapping buffers all the time, RSS flat), and
three leakers: a raw-mmap pool, memfds held untouched (RSS flat: only the footprint grows), and a
pool leaker in a container of its own (contained.sh: its pid 1 there is shown beside the host's).
"""

from __future__ import annotations

import subprocess
from contextlib import ExitStack

from conftest import leakhunt_json, run_leakhunt
from test_namespace_trace import contained

from leakhunt.proc.node import parse_placement, placement

MiB = 2**20
CROWD = 200


def test_the_leakers_come_first_among_200_steady_processes(leakers, spawn):
    with ExitStack() as stack:
        crowd = [
            subprocess.Popen(
                [leakers / "steady", "--rate", "64K", "--chunk", "16K"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(CROWD)
        ]
        stack.callback(lambda: [p.kill() or p.wait() for p in crowd])
        pool = spawn([leakers / "pool_leaker", "--rate", "2M", "--chunk", "512K"])
        memfd = spawn([leakers / "memfd_leaker", "--rate", "2M", "--chunk", "256K"])
        boxed = stack.enter_context(contained(leakers, "pool_leaker", "--rate", "2M", "--chunk", "512K"))
        doc = leakhunt_json("top", "--interval", "2s", "--duration", "24s", timeout=120)
    procs = doc["processes"]
    assert doc["ticks"] >= 10 and len(procs) >= CROWD + 3
    leaking = [p for p in procs if p["leak"]]
    assert {p["pid"] for p in leaking} == {pool.pid, memfd.pid, boxed.pid}, [
        (p["pid"], p["command"][:40], p["footprint_slope_bytes_per_s"]) for p in leaking
    ]
    assert {p["pid"] for p in procs[:3]} == {pool.pid, memfd.pid, boxed.pid}  # highest slope first
    by_pid = {p["pid"]: p for p in procs}
    for pid in (pool.pid, memfd.pid, boxed.pid):
        assert abs(by_pid[pid]["footprint_slope_bytes_per_s"] - 2 * MiB) < 0.4 * MiB, by_pid[pid]
    assert by_pid[boxed.pid]["nspid"] == 1 and by_pid[pool.pid]["nspid"] == pool.pid
    m = by_pid[memfd.pid]  # its RSS stays flat: only the footprint shows it
    assert m["held_shm_bytes"] > 8 * MiB and m["footprint_bytes"] - m["rss_bytes"] > 8 * MiB
    steady = [p for p in procs if p["command"].endswith("steady --rate 64K --chunk 16K")]
    assert len(steady) == CROWD and not any(p["leak"] for p in steady)


def test_match_and_cgroup_narrow_the_node(leakers, spawn):
    a = spawn([leakers / "steady", "--rate", "64K"])
    doc = leakhunt_json("top", "--interval", "1s", "--duration", "3s", "--match", r"build/steady\b")
    assert [p["pid"] for p in doc["processes"]] == [a.pid]
    mine = placement(a.pid).cgroup
    doc = leakhunt_json("top", "--interval", "1s", "--duration", "2s", "--cgroup", mine)
    assert a.pid in {p["pid"] for p in doc["processes"]}
    doc = leakhunt_json("top", "--interval", "1s", "--duration", "2s", "--cgroup", "/no/such/cgroup")
    assert doc["processes"] == []


def test_container_and_pod_names_from_cgroup_paths():
    """The path shapes Docker, containerd and Kubernetes (cgroupfs and systemd drivers) write."""
    cid = "4c01db0b339c" + "a" * 52
    uid = "8a3e0e1c-9f4b-4c1e-b0a5-3f3c2d1e0f9a"
    cases = {
        f"0::/system.slice/docker-{cid}.scope": (cid[:12], None),
        f"4:memory:/docker/{cid}": (cid[:12], None),
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope": (
            cid[:12],
            uid,
        ),
        f"4:memory:/kubepods/burstable/pod{uid}/{cid}": (cid[:12], uid),
        "0::/user.slice/user-1000.slice/session-3.scope": (None, None),
    }
    for line, (container, pod) in cases.items():
        p = parse_placement(line + "\n")
        assert (p.container, p.pod) == (container, pod), line


def test_bad_input_is_one_line():
    for args, message in (
        (["--match", "("], "not a regular expression"),
        (["--json"], "--json needs --duration"),
    ):
        cp = run_leakhunt("top", *args)
        assert cp.returncode == 2 and message in cp.stderr and cp.stderr.count("\n") == 1, cp.stderr
    cp = run_leakhunt("top", "--interval", "0s")  # refused by the option's type, before anything runs
    assert cp.returncode == 2 and "must be more than zero" in cp.stderr
