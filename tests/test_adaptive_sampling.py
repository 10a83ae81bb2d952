"""Adaptive sampling: cheap samples (status counters) between full smaps reads must judge as well
as full sampling. Both watch the same real process at once, so they see the same growth."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

SUBJECTS = {
    "pool": (["pool_leaker", "--rate", "1M", "--chunk", "64K"], True),  # mmap'd pool: anon
    "malloc": (["malloc_leaker", "--rate", "1M", "--chunk", "16K"], True),  # the brk heap
    "steady": (["steady"], False),
}


def _watch(pid: int, full_every: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "leakhunt", "watch", "--pid", str(pid), "--duration", "20s"]
    argv += ["--full-every", str(full_every), "--json"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def docs(leakers):
    procs = {
        name: subprocess.Popen([leakers / argv[0], *argv[1:]], stdout=subprocess.PIPE, text=True)
        for name, (argv, _) in SUBJECTS.items()
    }
    runs = {}
    try:
        for p in procs.values():
            assert p.stdout.readline().startswith("ready")
        runs = {(name, n): _watch(p.pid, n) for name, p in procs.items() for n in (1, 10)}
        out = {}
        for key, r in runs.items():
            stdout, stderr = r.communicate(timeout=120)
            assert r.returncode == 0, f"{key}: {stderr}"
            out[key] = json.loads(stdout)
        return out
    finally:
        for p in [*procs.values(), *runs.values()]:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.mark.parametrize("name", SUBJECTS)
def test_cheap_samples_judge_as_full_ones_do(docs, name):
    full, adaptive = docs[(name, 1)], docs[(name, 10)]
    assert full["leak"] is adaptive["leak"] is SUBJECTS[name][1], (full["verdict"], adaptive["verdict"])
    assert adaptive["full_samples"] <= full["full_samples"] / 2, adaptive["full_samples"]
    if SUBJECTS[name][1]:
        a, b = full["rss_slope_bytes_per_s"], adaptive["rss_slope_bytes_per_s"]
        assert abs(a - b) <= 0.05 * a, (a, b)
        top_full, top_adaptive = full["top_groups"][0], adaptive["top_groups"][0]
        assert (top_full["class"], top_full["path"]) == (top_adaptive["class"], top_adaptive["path"])
        assert abs(top_full["slope_bytes_per_s"] - top_adaptive["slope_bytes_per_s"]) <= 0.1 * a


def test_history_stays_bounded_and_keeps_the_whole_run():
    """A day at 1 Hz: the series are thinned, the slope and the first and last points are kept."""
    from leakhunt.analysis.summary import summarize
    from leakhunt.proc.classes import RegionClass
    from leakhunt.proc.sampler import MAX_POINTS, History

    h = History()
    day = 86_400
    for i in range(day):
        rss = 100 * 2**20 + 1024 * i  # 1 KiB/s
        h.append(
            float(i),
            1e9 + i,
            rss,
            {RegionClass.ANON: rss},
            {(RegionClass.ANON, ""): rss},
            {},
            0.001,
            pss=rss,
            uss=i,
        )
    assert len(h) <= MAX_POINTS and h.samples == day
    assert h.t[0] == 0.0 and h.t[-1] == day - 1 and h.t == sorted(h.t)
    series = (h.ts, h.rss, h.footprint, h.group_rss, h.classes[RegionClass.ANON], h.pss, h.uss)
    assert all(len(s) == len(h) for s in series)
    assert h.uss[0] == 0 and h.uss[-1] == day - 1  # a tree's PSS and USS are thinned with the rest
    summary = summarize(h)
    assert summary.samples == day
    assert abs(summary.rss.verdict.trend.slope - 1024) < 1, summary.rss.verdict.trend


def _full_reads(leakers, argv: list[str], takes: int, pause: float) -> int:
    from leakhunt.proc.sampler import Sampler
    from leakhunt.proc.target import open_target

    proc = subprocess.Popen([leakers / argv[0], *argv[1:]], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        sampler = Sampler(open_target(proc.pid), full_every=2)
        for _ in range(takes):
            sampler.take()
            time.sleep(pause)
        return sampler.full_samples
    finally:
        proc.kill()
        proc.wait()


def test_full_reads_back_off_while_nothing_changes_and_come_back_when_it_does(leakers):
    """A steady process: full reads at samples 0, 2, 6, 14, 30 (the gap doubles to 8 x 2), not
    every second one. A process growing 2 MiB between samples keeps the cadence of --full-every."""
    assert _full_reads(leakers, ["steady"], 40, 0.0) <= 6
    assert _full_reads(leakers, ["pool_leaker", "--rate", "8M", "--chunk", "64K"], 20, 0.25) >= 9
