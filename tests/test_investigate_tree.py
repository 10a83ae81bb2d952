"""`leakhunt investigate --subprocesses`: the leaking child of a tree named with its pid, whether it
existed when tracing began (added to the tracer, with either BPF backend) or appeared later
(followed at fork); the other processes left alone; a segment all three map counted once; a child
that exits reported, not an error; a target with children and no flag gets a hint."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from conftest import run_leakhunt

from leakhunt.analysis.processes import ProcessReport

MiB = 2**20
pytestmark = pytest.mark.bpf

#: name -> (the tree's arguments, investigate's extra arguments)
TREES = {
    "existing-bcc": (["--late", "0"], ["--backend", "bcc"]),
    "existing-bpftrace": (["--late", "0"], ["--backend", "bpftrace"]),
    # late enough that three tracers compiling at once on two cores are running by then
    "later": (["--late", "15"], []),
}


def _tree(leakers, args: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(leakers / "tree"), "--rate", "4M", "--shared", "32M", *args], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().startswith("ready")
    return proc


def _investigate(pid: int, *extra: str) -> tuple[dict, str]:
    cp = subprocess.run(
        [
            sys.executable,
            "-m",
            "leakhunt",
            "investigate",
            "--pid",
            str(pid),
            "--subprocesses",
            "--duration",
            "40s",
            "--json",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout), cp.stderr


@pytest.fixture(scope="module")
def trees(leakers):
    """Every tree of TREES investigated at once: {name: (root pid, document)}."""
    procs = {name: _tree(leakers, args) for name, (args, _) in TREES.items()}
    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            runs = {name: pool.submit(_investigate, p.pid, *TREES[name][1]) for name, p in procs.items()}
            return {name: (procs[name].pid, run.result()[0]) for name, run in runs.items()}
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(10)


def _leaking_child(root: int, doc: dict) -> dict:
    leaking = [p for p in doc["processes"] if p["leak"]]
    assert len(leaking) == 1, [(p["pid"], p["verdict"]) for p in doc["processes"]]
    assert leaking[0]["pid"] != root and leaking[0]["ppid"] == root
    return leaking[0]


@pytest.mark.parametrize("name", list(TREES))
def test_the_leaking_child_is_the_culprit_with_its_pid(trees, name):
    root, doc = trees[name]
    child = _leaking_child(root, doc)
    assert doc["leak"] is True and doc["stopped_because"] == "verdict confident"
    top = doc["culprits"][0]
    assert (top["pid"], top["class"], top["symbol"]) == (child["pid"], "anon", "leaking")
    assert top["library"] == "tree" and top["share"] >= 0.95 and doc["explained_fraction"] >= 0.95
    assert doc["verdict"].startswith(f"pid {child['pid']} (") and f"a child of pid {root}" in doc["verdict"]
    assert child["culprits"] == ["tree!leaking"]
    assert all(not p["culprits"] for p in doc["processes"] if p is not child)
    # The same document as watch's (test_watch_tree), and the pid given is the root.
    fields = {f.name for f in dataclasses.fields(ProcessReport)}
    assert all(set(p) == fields for p in doc["processes"])
    assert [p["pid"] for p in doc["processes"] if p["root"]] == [root]
    assert doc["lost_events"] == 0


def test_children_there_at_the_start_and_later_ones(trees):
    existing = _leaking_child(*trees["existing-bcc"])
    later = _leaking_child(*trees["later"])
    assert existing["first_seen_s"] == 0.0
    assert later["first_seen_s"] > 0.0  # forked after tracing began: picked up, followed at fork


def test_shared_segment_is_counted_once_in_the_tree(trees):
    _, doc = trees["existing-bcc"]
    assert len(doc["processes"]) == 3
    assert all(p["rss_bytes_end"] >= 32 * MiB for p in doc["processes"])  # resident in every process
    assert doc["memory"]["classes"]["shm"]["rss_bytes"] == 32 * MiB
    assert doc["memory"]["rss_bytes_end"] < sum(p["rss_bytes_end"] for p in doc["processes"]) - 60 * MiB
    assert doc["tree"]["rss_counting"].startswith("private pages")


def test_json_contract_of_the_processes(trees):
    _, doc = trees["later"]
    assert doc["subprocesses"] is True
    for p in doc["processes"]:
        for key in (
            "pid",
            "ppid",
            "cmdline",
            "rss_bytes_start",
            "rss_bytes_end",
            "rss_slope_bytes_per_s",
            "leak",
            "top_groups",
            "culprits",
            "ended",
            "first_seen_s",
        ):
            assert key in p


def test_a_child_that_exits_is_reported_not_an_error(leakers, tmp_path):
    # A shell with two children: the pool leaker, and a sleep that ends mid-run (once
    # investigate has sampled it: killed then, whatever the machine's speed).
    script = f'"{leakers / "pool_leaker"}" --rate 4M --chunk 256K & sleep 600 & wait'
    shell = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True)
    rec = tmp_path / "rec"
    try:
        leaker = int(shell.stdout.readline().split()[1])
        sleep = next(p for p in psutil.Process(shell.pid).children() if p.name() == "sleep")
        inv = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "leakhunt",
                "investigate",
                "--pid",
                str(shell.pid),
                "--subprocesses",
                "--duration",
                "40s",
                "--record",
                str(rec),
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while not _sampled(rec, sleep.pid, 3):
            assert inv.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        sleep.kill()
        out, err = inv.communicate(timeout=120)
        doc = json.loads(out)
    finally:
        for child in psutil.Process(shell.pid).children():
            child.terminate()
        shell.terminate()
        shell.wait(10)
    procs = {p["pid"]: p for p in doc["processes"]}
    sleeper = procs[sleep.pid]
    assert sleeper["ended"] == "exited" and sleeper["ended_at_s"] > 0
    assert any(f"pid {sleeper['pid']}" in n and "exited" in n for n in doc["notes"])
    top = doc["culprits"][0]
    assert (top["pid"], top["symbol"]) == (leaker, "lkpool_grow")


def _sampled(rec, pid: int, n: int) -> bool:
    """Whether a recording in progress holds ``n`` samples of ``pid`` yet."""
    try:
        lines = (rec / "samples.jsonl").read_text().splitlines()
    except OSError:
        return False
    return sum(f'"pid":{pid},' in line.replace(" ", "") for line in lines) >= n


def test_a_target_with_children_gets_a_hint(leakers, spawn):
    proc = spawn([leakers / "tree", "--late", "0", "--rate", "1M"])
    cp = run_leakhunt("investigate", "--pid", proc.pid, "--duration", "3s", "--json")
    assert cp.returncode == 0, cp.stderr
    assert "add --subprocesses" in cp.stderr
    # Watched alone, the target is a tree of one: the same document, one process in it, its own RSS.
    doc = json.loads(cp.stdout)
    assert doc["subprocesses"] is False
    assert [(p["pid"], p["root"]) for p in doc["processes"]] == [(proc.pid, True)]
    assert set(doc["processes"][0]) == {f.name for f in dataclasses.fields(ProcessReport)}
    assert doc["tree"]["rss_counting"] == "the process's own RSS"
    one, memory = doc["processes"][0], doc["memory"]
    assert (one["rss_bytes_end"], one["rss_slope_bytes_per_s"]) == (
        memory["rss_bytes_end"],
        memory["rss_slope_bytes_per_s"],
    )
    assert (one["own_verdict_leak"], one["verdict"]) == (memory["leak"], memory["verdict"])
