"""`leakhunt export`: real processes, real HTTP scrapes parsed by prometheus_client's own parser,
processes that come and go under --match, and bad input."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import run_leakhunt
from prometheus_client.parser import text_string_to_metric_families


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Exporter:
    def __init__(self, *args) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "leakhunt",
                "export",
                "--port",
                str(self.port),
                "--interval",
                "0.5s",
                *map(str, args),
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        said = []  # notes may come first (a --ledger that a tracer has not created yet)
        while not (line := self.proc.stderr.readline()).startswith("serving http://127.0.0.1:"):
            said.append(line)
            if not line:  # it exited: EOF (reading on while it runs would never return)
                raise AssertionError(f"export exited with {self.proc.wait()}: {''.join(said)}")

    def scrape(self) -> dict[str, list]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as r:
            text = r.read().decode()
        by_name: dict[str, list] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                by_name.setdefault(sample.name, []).append(sample)
        return by_name

    def value(self, metrics: dict, name: str, **labels) -> float | None:
        for s in metrics.get(name, []):
            if all(s.labels.get(k) == str(v) for k, v in labels.items()):
                return s.value
        return None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture
def exporter():
    started: list[Exporter] = []

    def start(*args) -> Exporter:
        e = Exporter(*args)
        started.append(e)
        return e

    yield start
    for e in started:
        e.stop()


def _wait_for(scrape, predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        metrics = scrape()
        if predicate(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.5)


def test_leaking_class_rises_between_two_scrapes(leakers, spawn, exporter):
    leaker = spawn([leakers / "pool_leaker", "--rate", "4M", "--chunk", "1M"])
    e = exporter("--pid", leaker.pid)
    first = e.scrape()
    before = e.value(first, "leakhunt_rss_bytes", pid=leaker.pid, **{"class": "anon"})
    assert before is not None
    second = _wait_for(
        e.scrape, lambda m: e.value(m, "leakhunt_leak", pid=leaker.pid, **{"class": "anon"}) == 1
    )
    after = e.value(second, "leakhunt_rss_bytes", pid=leaker.pid, **{"class": "anon"})
    assert after - before >= 4 << 20
    lower = e.value(
        second, "leakhunt_rss_slope_bytes_per_second", pid=leaker.pid, bound="lower", **{"class": "anon"}
    )
    assert lower > 1 << 20
    assert e.value(second, "leakhunt_leak", pid=leaker.pid, **{"class": "total"}) == 1
    assert e.value(second, "leakhunt_group_rss_bytes", pid=leaker.pid, path="[anon]", **{"class": "anon"}) > 0


def test_footprint_and_the_kernels_charge(leakers, spawn, exporter):
    """A memfd leak: RSS flat, the footprint and the cgroup's shmem rise, the footprint judged."""
    leaker = spawn([leakers / "memfd_leaker", "--rate", "4M", "--chunk", "256K"])
    e = exporter("--pid", leaker.pid)
    first = e.scrape()
    before = e.value(first, "leakhunt_footprint_bytes", pid=leaker.pid)
    second = _wait_for(e.scrape, lambda m: e.value(m, "leakhunt_footprint_leak", pid=leaker.pid) == 1)
    assert e.value(second, "leakhunt_footprint_bytes", pid=leaker.pid) - before >= 4 << 20
    assert (
        e.value(second, "leakhunt_footprint_slope_bytes_per_second", pid=leaker.pid, bound="lower") > 1 << 20
    )
    assert e.value(second, "leakhunt_leak", pid=leaker.pid, **{"class": "total"}) == 0  # RSS is flat
    objects = e.value(second, "leakhunt_held_shm_objects", pid=leaker.pid, state="all")
    assert objects and objects == e.value(
        second, "leakhunt_held_shm_objects", pid=leaker.pid, state="deleted"
    )
    assert e.value(second, "leakhunt_held_shm_bytes", pid=leaker.pid) >= objects * 256 * 1024
    usage = [s for s in second.get("leakhunt_cgroup_usage_bytes", []) if s.labels["pid"] == str(leaker.pid)]
    assert usage and usage[0].value > 0
    shmem = e.value(second, "leakhunt_cgroup_stat_bytes", pid=leaker.pid, kind="shmem")
    assert shmem >= e.value(second, "leakhunt_held_shm_bytes", pid=leaker.pid) * 0.9
    assert e.value(second, "leakhunt_dev_shm_size_bytes", pid=leaker.pid) > 0


def test_binds_loopback_by_default(leakers, spawn, exporter):
    e = exporter("--pid", spawn([leakers / "steady"]).pid)
    listening = [line.split() for line in open("/proc/net/tcp").read().splitlines()[1:]]
    local = {row[1] for row in listening if row[3] == "0A"}  # 0A: LISTEN
    assert f"0100007F:{e.port:04X}" in local


def test_match_follows_processes_that_come_and_go(exporter):
    token = f"lk-export-test-{time.monotonic_ns()}"
    e = exporter("--match", token)
    assert e.value(e.scrape(), "leakhunt_targets") == 0
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", token])
    try:
        seen = _wait_for(
            e.scrape, lambda m: e.value(m, "leakhunt_process_rss_bytes", pid=proc.pid) is not None
        )
        assert e.value(seen, "leakhunt_process_rss_bytes", pid=proc.pid) > 0
    finally:
        proc.kill()
        proc.wait()
    gone = _wait_for(e.scrape, lambda m: e.value(m, "leakhunt_targets_lost_total") == 1)
    assert e.value(gone, "leakhunt_targets_lost_total") == 1
    assert e.value(gone, "leakhunt_process_rss_bytes", pid=proc.pid) is None
    assert e.value(gone, "leakhunt_targets") == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pid", "999999999"], "no process"),
        (["--match", "("], "not a regular expression"),
        ([], "give --pid"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    cp = run_leakhunt("export", *args, "--duration", "1s")
    assert cp.returncode == 2 and message in cp.stderr and "Traceback" not in cp.stderr


def test_port_in_use_is_exit_2(leakers, spawn):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cp = run_leakhunt(
            "export",
            "--pid",
            spawn([leakers / "steady"]).pid,
            "--port",
            s.getsockname()[1],
            "--duration",
            "1s",
        )
    assert cp.returncode == 2 and "cannot serve" in cp.stderr


def test_culprits_come_from_a_ledger_written_beside_the_exporter(leakers, spawn, exporter, tmp_path):
    from leakhunt.record import SessionWriter

    target = spawn([leakers / "steady"])
    writer = SessionWriter(tmp_path / "trace", "trace-mmap", {"pid": target.pid})
    writer.append(
        "ledger",
        {
            "ts": time.time(),
            "callers": [
                {"caller": "libucm.so!ucm_orig_mmap_syscall", "bytes": 64 << 20, "mappings": 64},
                {"caller": "python!balanced", "bytes": 0, "mappings": 0},
            ],
        },
    )
    with open(tmp_path / "trace" / "ledger.jsonl", "ab") as f:
        f.write(b'{"ts": 1, "callers": [')  # the record trace-mmap is writing right now
    e = exporter("--pid", target.pid, "--ledger", tmp_path / "trace")
    metrics = e.scrape()
    assert (
        e.value(
            metrics,
            "leakhunt_culprit_outstanding_bytes",
            pid=target.pid,
            caller="libucm.so!ucm_orig_mmap_syscall",
        )
        == 64 << 20
    )
    assert e.value(metrics, "leakhunt_culprit_outstanding_bytes", caller="python!balanced") is None


@pytest.mark.bpf
def test_live_trace_feeds_the_exporter(leakers, spawn, exporter, tmp_path):
    leaker = spawn([leakers / "pool_leaker", "--rate", "4M", "--chunk", "1M"])
    trace = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "leakhunt",
            "trace-mmap",
            "--pid",
            str(leaker.pid),
            "--duration",
            "20s",
            "--record",
            str(tmp_path / "trace"),
            "--json",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        e = exporter("--pid", leaker.pid, "--ledger", tmp_path / "trace")
        metrics = _wait_for(
            e.scrape,
            lambda m: (
                (
                    e.value(
                        m,
                        "leakhunt_culprit_outstanding_bytes",
                        pid=leaker.pid,
                        caller="libleakpool.so!lkpool_grow",
                    )
                    or 0
                )
                > 2 << 20
            ),
        )
        assert (
            e.value(
                metrics,
                "leakhunt_culprit_outstanding_bytes",
                pid=leaker.pid,
                caller="libleakpool.so!lkpool_grow",
            )
            > 2 << 20
        )
    finally:
        trace.terminate()
        trace.wait(30)


def test_a_ledger_directory_that_holds_something_else_is_refused(tmp_path):
    """A typo that names another directory must not pass for a ledger still to come; an empty
    directory, or one a trace-mmap beside export is creating (its lock is there first), is fine."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a recording")
    cp = run_leakhunt("export", "--pid", os.getpid(), "--ledger", other, "--duration", "1s", "--port", "0")
    assert cp.returncode == 2 and "not a leakhunt recording" in cp.stderr, cp.stderr
    coming = tmp_path / "coming"
    (coming / "snapshots").mkdir(parents=True)
    (coming / ".lock").touch()
    cp = run_leakhunt("export", "--pid", os.getpid(), "--ledger", coming, "--duration", "1s", "--port", "0")
    assert cp.returncode == 0, cp.stderr
