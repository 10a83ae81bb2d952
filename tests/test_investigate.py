"""`leakhunt investigate` on the fixtures leakers: the right culprit first, the growth explained,
the controls left alone, a 50 MB/min leak decided inside a minute, and the post-mortem path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import leakhunt_json, need, run_leakhunt

from leakhunt.record import Recording

MiB = 2**20
pytestmark = pytest.mark.bpf

LEAKERS = {
    "pool": (["pool_leaker", "--rate", "4M", "--chunk", "512K", "--churn", "100"], "anon", "lkpool_grow"),
    "shm": (["shm_leaker", "--rate", "4M", "--chunk", "256K"], "shm", None),
    "heap": (["malloc_leaker", "--rate", "4M", "--chunk", "1K"], "heap", None),
    "arena": (["malloc_leaker", "--rate", "4M", "--chunk", "64K", "--threads-arena"], "anon", None),
}
CONTROLS = {f"steady-{i}": ["steady", "--rate", f"{4 * (i + 1)}M", "--chunk", "256K"] for i in range(5)} | {
    f"plateau-{i}": ["plateau", "--rate", f"{4 + 2 * i}M", "--cap", f"{40 + 10 * i}M", "--chunk", "1M"]
    for i in range(5)
}


def _investigate_all(
    leakers, targets: dict[str, list[str]], duration: str, batch: int = 5
) -> dict[str, dict]:
    """Start every target, investigate them `batch` at a time, return the JSON documents."""
    results = {}
    names = list(targets)
    for start in range(0, len(names), batch):
        procs, runs = {}, {}
        try:
            for name in names[start : start + batch]:
                argv = [str(leakers / targets[name][0]), *targets[name][1:]]
                procs[name] = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
                assert procs[name].stdout.readline().startswith("ready")
            for name, p in procs.items():
                runs[name] = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "leakhunt",
                        "investigate",
                        "--pid",
                        str(p.pid),
                        "--duration",
                        duration,
                        "--json",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            for name, r in runs.items():
                out, err = r.communicate(timeout=300)
                assert r.returncode == 0, f"{name}: {err}"
                results[name] = json.loads(out)
        finally:
            for p in [*procs.values(), *runs.values()]:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for p in procs.values():
                for path in os.listdir("/dev/shm"):
                    if path.startswith(f"lk_shm_{p.pid}_"):
                        os.unlink(f"/dev/shm/{path}")
    return results


@pytest.fixture(scope="module")
def leaks(leakers):
    return _investigate_all(leakers, {k: v[0] for k, v in LEAKERS.items()}, "40s", batch=4)


@pytest.fixture(scope="module")
def controls(leakers):
    return _investigate_all(leakers, CONTROLS, "25s", batch=5)


@pytest.mark.parametrize("name", list(LEAKERS))
def test_right_culprit_first(leaks, name):
    doc = leaks[name]
    _, klass, symbol = LEAKERS[name]
    assert doc["leak"] is True, doc["verdict"]
    top = doc["culprits"][0]
    assert top["class"] == klass
    if symbol:
        assert (top["library"], top["symbol"]) == ("libleakpool.so", symbol)
        assert top["known"]["id"] == "leakhunt-fixture-pool"
        assert "lkpool_mpool_get" in " ".join(top["stack"])
    assert doc["stopped_because"] == "verdict confident"


@pytest.mark.parametrize("name", ["pool", "shm", "arena"])
def test_mmap_based_leaks_are_at_least_95_percent_explained(leaks, name):
    doc = leaks[name]
    assert doc["explained_fraction"] >= 0.95
    assert doc["culprits"][0]["share"] >= 0.9


def test_shm_culprit_is_named_by_its_segments(leaks):
    top = leaks["shm"]["culprits"][0]
    assert top["detail"] == "segments /dev/shm/lk_shm_*_*"
    assert top["known"]["id"] == "leakhunt-fixture-shm"
    assert any("unlink" in r or "rm /dev/shm" in r for r in top["remedies"])


def test_heap_leak_points_at_malloc_and_its_caller(leaks):
    top = leaks["heap"]["culprits"][0]
    assert top["known"]["id"] == "glibc-malloc"
    # the traced brk's caller past libc, or (with the page-fault source) the code that filled it
    caller = top["origin"] if top["evidence"].startswith("traced") else f"{top['library']}!{top['symbol']}"
    assert caller.startswith("malloc_leaker!"), top
    assert any("memray" in r for r in top["remedies"])


def test_verdict_is_one_sentence_with_the_remedy(leaks):
    verdict = leaks["pool"]["verdict"]
    assert "libleakpool.so" in verdict and "lkpool_grow" in verdict and "\n" not in verdict
    assert "%" in verdict


def test_json_contract(leaks):
    doc = leaks["pool"]
    for key in ("leak", "verdict", "rss_slope_bytes_per_s", "explained_fraction", "culprits"):
        assert key in doc
    for key in ("library", "symbol", "stack", "bytes", "slope_bytes_per_s", "share", "known", "remedies"):
        assert key in doc["culprits"][0]
    assert doc["culprits"][0]["slope_bytes_per_s"] == pytest.approx(4 * MiB, rel=0.2)
    assert doc["nspid"][0] == doc["pid"]
    device = doc["device_memory"]  # NVML: a series where there is a GPU, else why not
    assert device["available"] is True or device["reason"]


def test_no_leak_runs_accuse_nobody(controls):
    assert len(controls) == 10
    for name, doc in controls.items():
        assert doc["leak"] is False, f"{name}: {doc['verdict']}"
        assert doc["culprits"] == [], name


def test_a_50MB_per_minute_leak_is_decided_within_60s(leakers, spawn):
    proc = spawn([leakers / "pool_leaker", "--rate", "833K", "--chunk", "64K"])
    doc = leakhunt_json("investigate", "--pid", proc.pid, "--duration", "60s")
    assert doc["leak"] is True and doc["stopped_because"] == "verdict confident"
    assert doc["duration_s"] <= 60
    assert doc["culprits"][0]["symbol"] == "lkpool_grow"


def test_recording_holds_the_verdict_and_renders(leakers, spawn, tmp_path):
    proc = spawn([leakers / "pool_leaker", "--rate", "4M", "--chunk", "1M"])
    rec_dir = tmp_path / "rec"
    doc = leakhunt_json("investigate", "--pid", proc.pid, "--duration", "30s", "--record", rec_dir)
    rec = Recording.open(rec_dir)
    assert rec.complete and rec.summary["attribution"]["culprits"][0]["symbol"] == "lkpool_grow"
    assert len(list(rec.records("verdict"))) >= 3
    assert {"samples", "ledger", "verdict"} <= set(rec.streams())
    assert len(rec.samples()) == doc["samples"]
    html = tmp_path / "report.html"
    cp = run_leakhunt("report", rec_dir, "--html", html)
    assert cp.returncode == 0, cp.stderr
    text = html.read_text()
    assert "lkpool_grow" in text and "planted leak" in text


def test_deep_stack_from_gdb_when_the_bpf_stack_is_shallow(leakers, spawn):
    """With --big-frame the leaking mmap's caller holds 64 KiB of locals: the BPF probe's 4 KiB
    copy of the stack ends in that frame, so its stack is the wrapper, lkpool_grow and the
    frame. investigate then takes a short gdb pass on the live process, whose stack reaches
    main, and shows it for the culprit; the target is left running and untraced."""
    need(shutil.which("gdb") is not None, "needs gdb")
    proc = spawn([leakers / "pool_leaker", "--rate", "8M", "--chunk", "256K", "--big-frame", "1"])
    doc = leakhunt_json("investigate", "--pid", proc.pid, "--duration", "40s", timeout=120)
    assert doc["leak"] is True and doc["stopped_because"] == "verdict confident"
    gdb = doc["gdb"]
    assert gdb is not None, doc["notes"]
    assert gdb["culprit"] == "libleakpool.so!lkpool_grow" and gdb["stacks"] >= 1
    text = " ".join(gdb["stack"])
    assert "lkpool_mpool_get_logged" in text and "lkpool_event_dispatch" in text and "main" in text
    top = doc["attribution"]["culprits"][0]
    assert top["stack"] == gdb["stack"]  # the culprit shows the deep stack, not the cut one
    assert proc.alive()
    status = open(f"/proc/{proc.pid}/status").read()
    assert "TracerPid:\t0" in status  # gdb detached
    assert status.split("State:\t", 1)[1][0] in "SR"  # and did not leave it stopped


def test_pid_that_does_not_exist():
    cp = run_leakhunt("investigate", "--pid", "4999999", "--duration", "5s")
    assert cp.returncode == 2 and cp.stderr.strip() == "leakhunt: error: no process with pid 4999999"
