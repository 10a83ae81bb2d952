"""`leakhunt top`'s loop: every process on the node sampled from the kernel's counters
(proc.node: no page-table walk per process) and ranked by how fast its footprint grows, leaking
ones first. ``top()`` returns a TopResult that the renderer and --json read.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from leakhunt.analysis.slope import thin
from leakhunt.analysis.verdict import MIN_GROWTH, MIN_SLOPE, judge
from leakhunt.proc.node import NodeSampler, ProcessTrack
from leakhunt.proc.sampler import Pace

#: Points of a process's series the ranking fits (bucket medians of longer ones).
RANK_POINTS = 120
#: The latest footprint values each line keeps for its sparkline.
TREND_POINTS = 32


@dataclass(frozen=True)
class NodeLine:
    """One process of the node, as ranked."""

    pid: int
    nspid: int
    command: str
    container: str | None
    pod: str | None
    cgroup: str
    rss_bytes: int
    footprint_bytes: int
    held_shm_bytes: int
    footprint_slope_bytes_per_s: float
    slope_interval: tuple[float, float]
    leak: bool
    samples: int
    trend: tuple[float, ...]  # the latest footprint values, oldest first

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["slope_interval"] = list(self.slope_interval)
        del doc["trend"]
        return doc


@dataclass(frozen=True)
class TopResult:
    lines: list[NodeLine]  # leaking first, then by footprint slope, highest first
    elapsed_s: float
    interval_s: float
    ticks: int
    ended: list[int]  # pids that were seen and exited (the latest proc.node.MAX_ENDED)

    @property
    def leaking(self) -> int:
        return sum(1 for line in self.lines if line.leak)

    def to_json(self) -> dict:
        return {
            "command": "top",
            "duration_s": self.elapsed_s,
            "interval_s": self.interval_s,
            "ticks": self.ticks,
            "processes": [line.to_json() for line in self.lines],
            "ended": self.ended,
        }


def judged(track: ProcessTrack) -> NodeLine:
    """One process's line. Every process is ranked at every refresh, so the robust verdict runs
    on at most RANK_POINTS bucket medians, and only for a series that moved more than the verdict's
    own growth floor (MIN_GROWTH: anything less cannot be a leak); the others get a least-squares
    slope, without an interval. (Theil-Sen over an hour of 5 s samples for 500 processes would
    cost seconds per refresh.)"""
    t, fp = thin(np.asarray(track.t, float), np.asarray(track.footprint, float), RANK_POINTS)
    if len(fp) >= 3 and np.ptp(fp) <= MIN_GROWTH:
        return _line(track, float(np.polyfit(t, fp, 1)[0]), (math.nan, math.nan), False)
    v = judge(t, fp, warmup_s=0.0, min_slope=MIN_SLOPE)
    slope = v.trend.slope if v.trend.samples >= 3 else 0.0
    lo, hi = v.trend.interval
    return _line(track, slope if slope == slope else 0.0, (lo, hi), v.leak)


def _line(track: ProcessTrack, slope: float, interval: tuple[float, float], leak: bool) -> NodeLine:
    return NodeLine(
        pid=track.pid,
        nspid=track.nspid,
        command=track.command,
        container=track.place.container,
        pod=track.place.pod,
        cgroup=track.place.cgroup,
        rss_bytes=int(track.rss[-1]) if track.rss else 0,
        footprint_bytes=int(track.footprint[-1]) if track.footprint else 0,
        held_shm_bytes=track.held,
        footprint_slope_bytes_per_s=slope,
        slope_interval=interval,
        leak=leak,
        samples=len(track.t),
        trend=tuple(float(v) for v in list(track.footprint)[-TREND_POINTS:]),
    )


def ranked(sampler: NodeSampler) -> list[NodeLine]:
    lines = [judged(track) for track in sampler.tracks.values()]
    lines.sort(key=lambda line: (not line.leak, -line.footprint_slope_bytes_per_s))
    return lines


def top(
    interval: float,
    duration: float | None,
    match: re.Pattern | None = None,
    cgroup: str | None = None,
    on_tick: Callable[[NodeSampler, float], None] | None = None,
) -> TopResult:
    """Sample the node every ``interval`` until ``duration`` (or Ctrl-C), then rank it.
    ``on_tick(sampler, elapsed)`` runs after every tick (the live table)."""
    sampler = NodeSampler(match, cgroup)
    elapsed = 0.0
    began = time.monotonic()
    try:
        for _ in Pace(interval, duration):
            elapsed = time.monotonic() - began
            sampler.tick(elapsed)
            if on_tick:
                on_tick(sampler, elapsed)
    except KeyboardInterrupt:
        pass
    return result(sampler, elapsed, interval)


def result(sampler: NodeSampler, elapsed: float, interval: float) -> TopResult:
    return TopResult(
        lines=ranked(sampler),
        elapsed_s=elapsed,
        interval_s=interval,
        ticks=sampler.tick_no,
        ended=list(sampler.ended),
    )
