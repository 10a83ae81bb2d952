"""`leakhunt watch --subprocesses`: a tree with a steady and a leaking child (which appears after
the watch began), and a shared segment resident in all three that must be counted once."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import leakhunt_json, run_leakhunt

from leakhunt.analysis.processes import ProcessReport

MiB = 2**20


@pytest.fixture(scope="module")
def tree_doc(leakers):
    import subprocess

    proc = subprocess.Popen(
        [str(leakers / "tree"), "--rate", "4M", "--shared", "32M", "--late", "2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("ready")
        doc = leakhunt_json("watch", "--pid", proc.pid, "--subprocesses", "--duration", "12s")
        return proc.pid, doc
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_leaking_child_is_named(tree_doc):
    root, doc = tree_doc
    procs = {p["pid"]: p for p in doc["processes"]}
    assert len(procs) == 3 and root in procs
    leaking = [p for p in procs.values() if p["leak"]]
    assert len(leaking) == 1 and leaking[0]["pid"] != root
    assert leaking[0]["rss_slope_bytes_per_s"] == pytest.approx(4 * MiB, rel=0.15)
    assert leaking[0]["first_seen_s"] >= 1.0  # it appeared after the watch began and was picked up
    assert all(not p["leak"] for p in procs.values() if p is not leaking[0])
    assert doc["leak"] is True and doc["subprocesses"] is True


def test_shared_segment_is_counted_once(tree_doc):
    _, doc = tree_doc
    procs = doc["processes"]
    assert all(p["rss_bytes_end"] >= 32 * MiB for p in procs)  # resident in every process
    rss_sum = sum(p["rss_bytes_end"] for p in procs)
    assert doc["classes"]["shm"]["rss_bytes"] == 32 * MiB
    assert doc["rss_bytes_end"] < rss_sum - 60 * MiB  # two of the three copies not counted
    assert abs(doc["rss_bytes_end"] - doc["tree"]["pss_bytes_end"]) < 4 * MiB


def test_process_entries_are_the_one_per_process_document(tree_doc):
    """watch and investigate (test_investigate_tree) write ProcessReport's fields, no more, no less."""
    root, doc = tree_doc
    fields = {f.name for f in dataclasses.fields(ProcessReport)}
    assert all(set(p) == fields for p in doc["processes"]), [
        sorted(set(p) ^ fields) for p in doc["processes"]
    ]
    assert [p["pid"] for p in doc["processes"] if p["root"]] == [root]
    assert all(p["ppid"] == root for p in doc["processes"] if not p["root"])
    assert set(doc["tree"]) >= {"rss_counting", "pss_bytes_end", "uss_bytes_end", "unreadable"}


def test_a_target_with_children_gets_a_hint(leakers, spawn):
    proc = spawn([leakers / "tree", "--late", "0", "--rate", "1M"])
    cp = run_leakhunt("watch", "--pid", proc.pid, "--duration", "1s", "--json")
    assert cp.returncode == 0
    assert "add --subprocesses" in cp.stderr
    alone = json.loads(cp.stdout)  # a tree of one: the same document as a tree's
    assert alone["subprocesses"] is False and [p["pid"] for p in alone["processes"]] == [proc.pid]
    assert set(alone["processes"][0]) == {f.name for f in dataclasses.fields(ProcessReport)}
    # Its one process is the tree: the same figures and the same verdict, judged once.
    one = alone["processes"][0]
    assert (one["rss_bytes_end"], one["rss_slope_bytes_per_s"]) == (
        alone["rss_bytes_end"],
        alone["rss_slope_bytes_per_s"],
    )
    assert (one["own_verdict_leak"], one["verdict"]) == (alone["leak"], alone["verdict"])
    followed = run_leakhunt("watch", "--pid", proc.pid, "--duration", "1s", "--json", "--subprocesses")
    assert followed.returncode == 0 and "add --subprocesses" not in followed.stderr


@pytest.mark.bpf
def test_every_command_with_subprocesses_hints_at_it(leakers, spawn):
    """trace-mmap, ci and export take --subprocesses too, and say so for a target with children."""
    proc = spawn([leakers / "tree", "--late", "0", "--rate", "1M"])
    for args in (
        ("trace-mmap", "--pid", proc.pid, "--duration", "1s", "--json"),
        (
            "ci",
            "--pid",
            proc.pid,
            "--max-slope",
            "1GB/min",
            "--interval",
            "0.2s",
            "--duration",
            "3s",
            "--json",
        ),
        ("export", "--pid", proc.pid, "--port", "0", "--duration", "1s"),
    ):
        cp = run_leakhunt(*args)
        assert cp.returncode == 0 and "add --subprocesses" in cp.stderr, (args[0], cp.stderr)


def test_ended_children_are_bounded(spawn, monkeypatch):
    """A root that forks one short-lived child after another (a worker per request): the sampler
    keeps the latest MAX_ENDED ended children and counts the ones it drops, instead of growing."""
    import time

    from leakhunt.proc import tree as tree_module
    from leakhunt.proc.target import open_target

    monkeypatch.setattr(tree_module, "MAX_ENDED", 2)
    root = spawn(["sh", "-c", "echo ready; while true; do sleep 0.6; done"])
    sampler = tree_module.TreeSampler(open_target(root.pid), interval=0.1)
    deadline = time.monotonic() + 60
    while sampler.forgotten < 3 and time.monotonic() < deadline:
        sampler.tick()
        time.sleep(0.1)
    ended = [t for t in sampler.tracks.values() if t.ended]
    assert sampler.forgotten >= 3, "no child was ever dropped"
    assert len(ended) <= 2 and root.alive()
    # The ones kept are the latest to end.
    assert all(t.ended_at >= max(0.0, sampler.tree.t[-1] - 10) for t in ended)
