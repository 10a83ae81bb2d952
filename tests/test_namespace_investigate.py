"""`investigate`, `watch` and `report` on targets in containers (fixtures/leakers/contained.sh):
the libleakpool leak named and explained from the host pid, /dev/shm segments that live in the
container's own /dev/shm classified and named by the container's paths, and both pids shown."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from contextlib import ExitStack

import pytest
from conftest import leakhunt_json, run_leakhunt
from test_namespace_trace import POOL_ARGS, contained

SHM_SEGMENTS = "/dev/shm/lk_shm_1_*"  # the leaker is pid 1 in its namespace


@pytest.fixture(scope="module")
def investigated(leakers):
    """The pool and the shm leakers, each in a container of its own, investigated at the same time."""
    with ExitStack() as stack:
        targets = {
            "pool": stack.enter_context(contained(leakers, "pool_leaker", *POOL_ARGS)),
            "shm": stack.enter_context(contained(leakers, "shm_leaker", "--rate", "4M", "--chunk", "256K")),
        }
        runs = {
            name: subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "leakhunt",
                    "investigate",
                    "--pid",
                    str(t.pid),
                    "--duration",
                    "40s",
                    "--json",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, t in targets.items()
        }
        docs = {}
        for name, run in runs.items():
            out, err = run.communicate(timeout=300)
            assert run.returncode == 0, f"{name}: {err}"
            docs[name] = json.loads(out)
        segments = {
            "inside": glob.glob(f"/proc/{targets['shm'].pid}/root{SHM_SEGMENTS}"),
            "host": glob.glob(SHM_SEGMENTS),
        }
        yield {"targets": targets, "docs": docs, "segments": segments}


@pytest.mark.bpf
def test_investigate_names_a_library_only_the_container_has(investigated):
    doc, target = investigated["docs"]["pool"], investigated["targets"]["pool"]
    assert doc["leak"] is True, doc["verdict"]
    top = doc["culprits"][0]
    assert (top["library"], top["symbol"], top["class"]) == ("libleakpool.so", "lkpool_grow", "anon")
    assert "lkpool_mpool_get" in " ".join(top["stack"])
    assert top["pid"] == target.pid  # the host pid, as given
    assert "libleakpool.so" in doc["verdict"] and "lkpool_grow" in doc["verdict"]


@pytest.mark.bpf
@pytest.mark.parametrize("name", ["pool", "shm"])
def test_container_growth_is_at_least_95_percent_explained(investigated, name):
    doc = investigated["docs"][name]
    assert doc["explained_fraction"] >= 0.95, doc["verdict"]
    assert doc["culprits"][0]["share"] >= 0.9


@pytest.mark.bpf
def test_shm_segments_of_the_container_are_classified_and_named(investigated):
    doc = investigated["docs"]["shm"]
    top = doc["culprits"][0]
    assert top["class"] == "shm" and top["detail"] == "segments /dev/shm/lk_shm_*_*"
    assert top["known"]["id"] == "leakhunt-fixture-shm"
    group = doc["memory"]["top_groups"][0]
    assert (group["class"], group["path"], group["leak"]) == ("shm", "/dev/shm/lk_shm_*_*", True)
    # The names are the container's: the segments are in its /dev/shm, reached through its root,
    # and none of them is in the host's.
    assert investigated["segments"]["inside"] and not investigated["segments"]["host"]


def test_watch_classifies_the_container_s_shm_and_carries_both_pids(leakers, tmp_path):
    with contained(leakers, "shm_leaker", "--rate", "4M", "--chunk", "256K") as target:
        doc = leakhunt_json(
            "watch",
            "--pid",
            target.pid,
            "--duration",
            "6s",
            "--interval",
            "0.5s",
            "--record",
            tmp_path / "rec",
        )
        inside = glob.glob(f"/proc/{target.pid}/root{SHM_SEGMENTS}")
    assert (doc["pid"], doc["nspid"]) == (target.pid, [target.pid, 1])
    assert doc["classes"]["shm"]["rss_growth_bytes"] >= 8 * 2**20
    assert doc["classes"]["shm"]["leak"] is True
    assert doc["top_groups"][0]["path"] == "/dev/shm/lk_shm_*_*"
    region = next(r for r in doc["top_regions"] if r["class"] == "shm")
    assert region["path"].startswith("/dev/shm/lk_shm_1_")
    assert len(inside) >= 30 and not os.path.exists(region["path"])  # only inside the container
    # The recording keeps both pids, and the report shows them.
    session = json.loads((tmp_path / "rec" / "session.json").read_text())
    assert session["nspid"] == [target.pid, 1]
    md = tmp_path / "report.md"
    cp = run_leakhunt("report", tmp_path / "rec", "--markdown", md)
    assert cp.returncode == 0, cp.stderr
    text = md.read_text()
    assert f"pid {target.pid} (1 in its pid namespace)" in text
    assert f"**target pid**: {target.pid} (1 in its pid namespace)" in text
    assert "nspid" not in text  # shown in words, not as a raw list


def test_report_of_a_host_process_shows_one_pid(leakers, spawn, tmp_path):
    proc = spawn([leakers / "steady", "--rate", "1M", "--chunk", "256K"])
    leakhunt_json(
        "watch", "--pid", proc.pid, "--duration", "2s", "--interval", "0.5s", "--record", tmp_path / "rec"
    )
    md = tmp_path / "report.md"
    assert run_leakhunt("report", tmp_path / "rec", "--markdown", md).returncode == 0
    text = md.read_text()
    assert f"**target pid**: {proc.pid}\n" in text and "pid namespace" not in text


def test_a_process_tree_in_a_container_is_followed_with_both_pids(leakers):
    """Children forked inside the container are found from the host by their host pids; each
    carries its pid inside, and the segment all three map is counted once."""
    with contained(leakers, "tree", "--rate", "4M", "--shared", "32M", "--late", "1") as target:
        doc = leakhunt_json("watch", "--pid", target.pid, "--subprocesses", "--duration", "10s")
    procs = {p["pid"]: p for p in doc["processes"]}
    assert len(procs) == 3 and procs[target.pid]["nspid"] == [target.pid, 1]
    assert all(len(p["nspid"]) == 2 and p["nspid"][0] == pid != p["nspid"][1] for pid, p in procs.items())
    leaking = [p for p in procs.values() if p["leak"]]
    assert len(leaking) == 1 and leaking[0]["pid"] != target.pid
    assert doc["classes"]["shm"]["rss_bytes"] == 32 * 2**20
