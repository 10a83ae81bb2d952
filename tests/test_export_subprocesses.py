"""`leakhunt export --pid ROOT --subprocesses`: every process of the tree exported with its own
series and labelled with its tree, the tree's own totals with a segment all three processes map
counted once, and a child that appears later picked up."""

from __future__ import annotations

import subprocess
import time

import pytest
from conftest import run_leakhunt
from test_export_metrics import Exporter

MiB = 2**20


@pytest.fixture
def tree(leakers):
    proc = subprocess.Popen(
        [str(leakers / "tree"), "--rate", "4M", "--shared", "32M", "--late", "2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().startswith("ready")
    yield proc
    proc.terminate()
    proc.wait(10)


def _scrape_until(exporter: Exporter, predicate, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        metrics = exporter.scrape()
        if predicate(metrics):
            return metrics
        assert time.monotonic() < deadline, "the exporter never showed it"
        time.sleep(0.5)


def test_every_process_of_the_tree_and_the_tree_counted_once(tree):
    exporter = Exporter("--pid", tree.pid, "--subprocesses")
    try:
        # The leaking child is forked 2 s after the others: it shows up on a later tick.
        m = _scrape_until(
            exporter,
            lambda m: (
                len(m.get("leakhunt_process_tree", [])) == 3
                and max(s.value for s in m["leakhunt_process_rss_bytes"]) > 48 * MiB
            ),
        )
        members = {int(s.labels["pid"]): int(s.labels["root"]) for s in m["leakhunt_process_tree"]}
        assert set(members.values()) == {tree.pid} and tree.pid in members
        rss = {pid: exporter.value(m, "leakhunt_process_rss_bytes", pid=pid) for pid in members}
        assert all(v >= 32 * MiB for v in rss.values())  # the segment is resident in every process
        tree_rss = exporter.value(m, "leakhunt_tree_rss_bytes", pid=tree.pid)
        assert exporter.value(m, "leakhunt_tree_processes", pid=tree.pid) == 3
        assert 32 * MiB <= tree_rss < sum(rss.values()) - 60 * MiB  # two of the three copies not counted
        assert exporter.value(m, "leakhunt_tree_pss_bytes", pid=tree.pid) == pytest.approx(
            tree_rss, abs=8 * MiB
        )
        child = max(rss, key=rss.get)  # the leaking one, grown past the others
        assert child != tree.pid
        time.sleep(1)
        later = exporter.scrape()
        assert exporter.value(later, "leakhunt_process_rss_bytes", pid=child) > rss[child]
    finally:
        exporter.stop()


def test_subprocesses_needs_a_pid():
    cp = run_leakhunt("export", "--match", "nothing-matches-this", "--subprocesses", "--duration", "1s")
    assert cp.returncode == 2 and "--pid" in cp.stderr
