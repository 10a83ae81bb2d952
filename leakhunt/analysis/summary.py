"""A run's memory story from its sample history: total, per class, per group and per range,
each with a verdict. watch, investigate, ci, report and export all render this one object."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leakhunt.analysis.verdict import MIN_SLOPE, Verdict, judge
from leakhunt.proc.classes import RegionClass
from leakhunt.proc.growth import range_growth
from leakhunt.proc.sampler import History

TOP_GROUPS = 10
TOP_REGIONS = 10


@dataclass(frozen=True)
class SeriesSummary:
    start: int
    end: int
    verdict: Verdict

    @property
    def growth(self) -> int:
        return self.end - self.start

    def to_json(self) -> dict:
        v = self.verdict
        return {
            "rss_bytes": self.end,
            "rss_bytes_start": self.start,
            "rss_growth_bytes": self.growth,
            "slope_bytes_per_s": v.trend.slope,
            "slope_interval": [v.trend.lo, v.trend.hi],
            "leak": v.leak,
        }


@dataclass(frozen=True)
class GroupSummary(SeriesSummary):
    klass: RegionClass = RegionClass.ANON
    path: str = ""
    regions: int = 0

    @property
    def label(self) -> str:
        return self.path or f"[{self.klass.value}]"

    def to_json(self) -> dict:
        return {"class": self.klass.value, "path": self.path, "regions": self.regions, **super().to_json()}


@dataclass(frozen=True)
class RegionGrowthSummary:
    start: int
    end: int
    klass: RegionClass
    path: str
    rss: int
    growth: int
    new: bool

    def to_json(self) -> dict:
        return {
            "start": hex(self.start),
            "end": hex(self.end),
            "class": self.klass.value,
            "path": self.path,
            "rss_bytes": self.rss,
            "rss_growth_bytes": self.growth,
            "new": self.new,
        }


@dataclass(frozen=True)
class MemorySummary:
    pid: int
    samples: int
    duration_s: float
    rss: SeriesSummary
    classes: dict[RegionClass, SeriesSummary]
    groups: list[GroupSummary]  # the top growing groups, most growth first
    regions: list[RegionGrowthSummary]  # the top growing address ranges
    device: SeriesSummary | None = None  # device memory (NVML), when it was sampled

    @property
    def leak(self) -> bool:
        return self.rss.verdict.leak

    def top_class(self) -> RegionClass | None:
        growing = [(s.growth, c) for c, s in self.classes.items() if s.growth > 0]
        return max(growing)[1] if growing else None

    def to_json(self) -> dict:
        v = self.rss.verdict
        return {
            "pid": self.pid,
            "duration_s": self.duration_s,
            "samples": self.samples,
            "rss_bytes_start": self.rss.start,
            "rss_bytes_end": self.rss.end,
            "rss_growth_bytes": self.rss.growth,
            "rss_slope_bytes_per_s": v.trend.slope,
            "slope_interval": [v.trend.lo, v.trend.hi],
            "leak": v.leak,
            "plateau": v.plateau,
            "verdict": v.reason,
            "warmup_s": v.warmup_s,
            "classes": {c.value: s.to_json() for c, s in self.classes.items()},
            "top_groups": [g.to_json() for g in self.groups],
            "top_regions": [r.to_json() for r in self.regions],
            "device_memory": {"available": True, **self.device.to_json()} if self.device else None,
        }


def summarize(
    history: History,
    warmup_s: float | None = None,
    min_slope: float = MIN_SLOPE,
    top: int = TOP_GROUPS,
    pid: int | None = None,
) -> MemorySummary:
    if not len(history):
        raise ValueError("no samples to summarize")
    t = np.asarray(history.t)

    def series(values) -> SeriesSummary:
        return SeriesSummary(
            int(values[0]), int(values[-1]), judge(t, values, warmup_s=warmup_s, min_slope=min_slope)
        )

    classes = {c: series(history.classes[c]) for c in RegionClass if any(history.classes[c])}
    first, last = history.group_rss[0], history.group_rss[-1]
    growth = sorted(
        ((last.get(k, 0) - first.get(k, 0), k) for k in history.group_keys()),
        key=lambda x: (-x[0], x[1][0].value, x[1][1]),
    )
    groups = []
    for g, key in growth[:top]:
        if g <= 0:
            break
        s = series(history.group_series(key))
        groups.append(
            GroupSummary(s.start, s.end, s.verdict, key[0], key[1], history.group_regions.get(key, 0))
        )
    regions: list[RegionGrowthSummary] = []
    if history.first is not None and history.last is not None and len(history) > 1:
        rg = range_growth(history.first.snapshot, history.last.snapshot)
        snap = rg.snapshot
        for i in rg.top(TOP_REGIONS):
            r = snap[i]
            regions.append(
                RegionGrowthSummary(
                    r.start, r.end, r.klass, r.path, r.rss, int(rg.growth[i]), bool(rg.new[i])
                )
            )
    if pid is None:
        pid = history.first.pid if history.first else 0
    device = series(history.gpu) if history.gpu and len(history.gpu) == len(history) else None
    return MemorySummary(
        pid, len(history), history.duration_s, series(history.rss), classes, groups, regions, device
    )
