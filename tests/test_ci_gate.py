"""`leakhunt ci`: the regression gate on real leakers, its JUnit XML, GitHub Actions output, and
the promise that a command it starts (and its load generator) never outlives it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import psutil
import pytest
from conftest import run_leakhunt

from leakhunt.ci import ERROR, FAIL, PASS, GateConfig, GateResult
from leakhunt.report import github

GATE = ("--max-slope", "5MB/min", "--interval", "0.5s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie that its parent has not reaped yet is gone for our purposes.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def leak_run(leakers, tmp_path_factory):
    """One gate run over the syscall-pool leaker, with everything switched on."""
    out = tmp_path_factory.mktemp("ci_leak")
    env = {**os.environ, "GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(out / "summary.md")}
    loadpid = out / "load.pid"
    cp = run_leakhunt(
        "ci",
        *GATE,
        "--duration",
        "8s",
        "--junit",
        out / "junit.xml",
        "--record",
        out / "rec",
        "--load",
        f"sh -c 'echo $$ > {loadpid}; exec sleep 600'",
        "--json",
        "--",
        leakers / "pool_leaker",
        "--rate",
        "4M",
        "--chunk",
        "1M",
        env=env,
    )
    return cp, out


def test_pool_leaker_fails_the_gate(leak_run):
    cp, _ = leak_run
    assert cp.returncode == FAIL, cp.stderr
    doc = json.loads(cp.stdout)
    assert doc["status"] == "fail"
    assert doc["summary"]["slope_interval"][0] > doc["max_slope_bytes_per_s"]
    assert doc["summary"]["classes"]["anon"]["rss_growth_bytes"] > 16 << 20
    # One process is a tree of one: the per-process document of watch and investigate, whose
    # figures are the gate's own.
    (one,) = doc["processes"]
    assert one["pid"] == doc["pid"] and one["root"] and one["leak"] and not doc["subprocesses"]
    assert one["footprint_slope_bytes_per_s"] == doc["summary"]["footprint_slope_bytes_per_s"]
    assert doc["tree"]["rss_counting"] == "the process's own RSS"


def test_junit_file_parses_and_reports_the_failure(leak_run):
    _, out = leak_run
    root = ET.parse(out / "junit.xml").getroot()
    suite = root.find("testsuite")
    assert suite.get("failures") == "1" and suite.get("errors") == "0"
    failure = suite.find("testcase/failure")
    assert failure is not None and "lower bound exceeds the limit" in failure.get("message")
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert float(props["slope_lower_bytes_per_s"]) > float(props["max_slope_bytes_per_s"])


def test_github_actions_get_an_error_annotation_and_a_step_summary(leak_run):
    cp, out = leak_run
    assert "::error title=leakhunt ci%3A memory leak::RSS grows" in cp.stderr
    summary = (out / "summary.md").read_text()
    assert "leakhunt ci — ❌ leak" in summary and "| anon |" in summary


def test_started_command_and_load_generator_are_stopped(leak_run):
    cp, out = leak_run
    doc = json.loads(cp.stdout)
    load_pid = int((out / "load.pid").read_text())
    deadline = time.monotonic() + 5  # not a timing claim: reaping by init can lag a moment
    while (_alive(doc["pid"]) or _alive(load_pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(doc["pid"]) and not _alive(load_pid)


def test_gate_run_is_recorded_for_the_report(leak_run):
    _, out = leak_run
    from leakhunt.record import Recording

    rec = Recording.open(out / "rec")
    assert rec.complete and rec.summary["status"] == "fail"
    assert len(rec.samples()) >= 10


def test_plateau_passes_the_gate(leakers, tmp_path):
    cp = run_leakhunt(
        "ci",
        *GATE,
        "--duration",
        "8s",
        "--junit",
        tmp_path / "junit.xml",
        "--",
        leakers / "plateau",
        "--rate",
        "8M",
        "--cap",
        "24M",
    )
    assert cp.returncode == PASS, cp.stdout + cp.stderr
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert suite.get("failures") == "0" and suite.get("errors") == "0"
    assert suite.find("testcase/failure") is None


def test_command_that_cannot_start_is_an_error(tmp_path):
    cp = run_leakhunt("ci", *GATE, "--junit", tmp_path / "junit.xml", "--", tmp_path / "no-such-program")
    assert cp.returncode == ERROR
    assert "failed to start" in cp.stderr and "Traceback" not in cp.stderr
    error = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite/testcase/error")
    assert error is not None and "failed to start" in error.get("message")


def test_missing_pid_is_an_error():
    cp = run_leakhunt("ci", *GATE, "--pid", "999999999")
    assert cp.returncode == ERROR and "Traceback" not in cp.stderr


def test_pid_and_command_together_are_refused(leakers):
    cp = run_leakhunt("ci", *GATE, "--pid", str(os.getpid()), "--", "true")
    assert cp.returncode == ERROR and "not both" in cp.stderr


def test_command_crashing_mid_run_is_an_error(tmp_path):
    cp = run_leakhunt("ci", *GATE, "--duration", "10s", "--json", "--", "sh", "-c", "sleep 1.5; exit 3")
    assert cp.returncode == ERROR
    assert "exited with status 3" in json.loads(cp.stdout)["reason"]


def test_annotation_escapes_newlines_and_percent():
    result = GateResult(GateConfig(1.0, 1.0), "x", None, None, PASS, "50% done\nnext")
    assert github.annotation(result) == "::notice title=leakhunt ci%3A no leak::50%25 done%0Anext"


def test_subprocesses_gate_the_tree_and_stop_it_whole(leakers, tmp_path):
    from leakhunt.record import Recording

    script = f"{leakers / 'pool_leaker'} --rate 4M --chunk 1M & {leakers / 'steady'} & wait"
    cp = run_leakhunt(
        "ci",
        *GATE,
        "--duration",
        "6s",
        "--subprocesses",
        "--record",
        tmp_path / "rec",
        "--json",
        "--",
        "sh",
        "-c",
        script,
    )
    assert cp.returncode == FAIL, ("the root shell does not grow, its child does", cp.stderr[-2000:])
    pids = Recording.open(tmp_path / "rec").pids()
    assert len(pids) == 3, cp.stderr[-2000:]
    doc = json.loads(cp.stdout)
    assert doc["subprocesses"] and {p["pid"] for p in doc["processes"]} == set(pids)
    leaking = [p["cmdline"] for p in doc["processes"] if p["leak"]]
    assert len(leaking) == 1 and "pool_leaker" in leaking[0], doc["processes"]
    deadline = time.monotonic() + 5
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, pids))


def test_commands_die_with_leakhunt_even_by_sigkill(tmp_path):
    """ci -- CMD: when leakhunt is killed outright, CMD and what it forked do not live on."""
    marker = tmp_path / "started"
    script = f"sleep 300 & sleep 300 & touch {marker}; wait"
    ci = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "leakhunt",
            "ci",
            "--max-slope",
            "1GB/min",
            "--duration",
            "120s",
            "--",
            "sh",
            "-c",
            script,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert ci.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    sh = next(
        p
        for p in psutil.Process(ci.pid).children()
        if p.name() == "sh" and "sleep 300" in " ".join(p.cmdline())
    )
    assert len([sh, *sh.children(recursive=True)]) == 3
    # The command's guard and its sleep too: the guard starts beside the command, and may still be
    # starting its sleep when the command has touched the marker.
    family = psutil.Process(ci.pid).children(recursive=True)
    while len(family) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
        family = psutil.Process(ci.pid).children(recursive=True)
    assert len(family) == 5, [p.cmdline() for p in family]
    ci.kill()
    ci.wait()
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.cmdline() for p in alive]


def test_a_finished_gate_leaves_no_process_behind(leakers):
    """ci -- CMD run to its end: the command, its guard and the guard's sleep are all gone."""
    before = {p.pid for p in psutil.process_iter()}
    cp = run_leakhunt(
        "ci", "--max-slope", "1GB/min", "--duration", "4s", "--interval", "0.2s", "--", leakers / "steady"
    )
    assert cp.returncode == 0, cp.stderr
    time.sleep(0.5)
    left = [
        p.info["cmdline"]
        for p in psutil.process_iter(["ppid", "name", "cmdline", "status"])
        if p.pid not in before
        and p.info["ppid"] == 1
        and p.info["name"] in ("sh", "sleep", "steady")
        and p.info["status"] != psutil.STATUS_ZOMBIE  # killed, not yet reaped by init
    ]
    assert not left, left
