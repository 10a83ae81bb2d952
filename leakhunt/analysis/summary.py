"""A run's memory story from its sample history: total, per class, per group and per range,
each with a verdict. watch, investigate, ci, report and export all render this one object."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from leakhunt.analysis.verdict import MIN_SLOPE, Verdict, judge
from leakhunt.proc.cgroup import CgroupReading, FsUsage, time_to
from leakhunt.proc.classes import RegionClass
from leakhunt.proc.growth import range_growth
from leakhunt.proc.sampler import History
from leakhunt.proc.shmem import HeldShm, ShmTotals, true_orphans

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
            "slope_interval": v.trend.interval,
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
class ChargeSummary:
    """A charge the kernel keeps outside the process (its memory cgroup, the /dev/shm filesystem):
    the latest reading, its series' verdict and how long until it is full at that rate."""

    series: SeriesSummary
    limit: int | None  # bytes; None: no limit
    time_to_limit_s: float | None  # None: not growing, or no limit

    @staticmethod
    def of(series: SeriesSummary, limit: int | None) -> ChargeSummary:
        v = series.verdict
        return ChargeSummary(series, limit, time_to(limit, series.end, v.trend.slope) if v.leak else None)

    def json_fields(self) -> dict:
        v = self.series.verdict
        return {
            "slope_bytes_per_s": v.trend.slope,
            "growing": v.leak,
            "time_to_limit_s": self.time_to_limit_s,
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
    footprint: SeriesSummary | None = None  # private memory plus held shared objects (the verdict's)
    held: SeriesSummary | None = None  # held shared objects alone, when there are any
    shm: ShmTotals | None = None  # the latest held shared memory
    held_objects: HeldShm | None = None  # the latest held objects one by one (live runs)
    cgroup: CgroupReading | None = None
    cgroup_charge: ChargeSummary | None = None
    dev_shm: FsUsage | None = None
    dev_shm_charge: ChargeSummary | None = None

    @property
    def main(self) -> SeriesSummary:
        """The series the verdict runs on: the footprint (RSS where it was not measured)."""
        return self.footprint or self.rss

    @property
    def main_label(self) -> str:
        """What the verdict's series is called: 'RSS' when no shared object adds to it."""
        return "footprint" if self.footprint is not None and self.footprint is not self.rss else "RSS"

    @property
    def verdict(self) -> Verdict:
        return self.main.verdict

    @property
    def leak(self) -> bool:
        return self.main.verdict.leak

    @property
    def hidden_shm(self) -> bool:
        """Whether the footprint grows by shared memory RSS does not show (the verdict differs,
        or most of the footprint's growth is not in RSS)."""
        if self.footprint is None:
            return False
        return self.footprint.growth - self.rss.growth > max(0.5 * self.footprint.growth, 1 << 20)

    def top_class(self) -> RegionClass | None:
        growing = [(s.growth, c) for c, s in self.classes.items() if s.growth > 0]
        return max(growing)[1] if growing else None

    def to_json(self) -> dict:
        v = self.verdict
        rss = self.rss.verdict
        main = self.main
        return {
            "pid": self.pid,
            "duration_s": self.duration_s,
            "samples": self.samples,
            "rss_bytes_start": self.rss.start,
            "rss_bytes_end": self.rss.end,
            "rss_growth_bytes": self.rss.growth,
            "rss_slope_bytes_per_s": rss.trend.slope,
            "slope_interval": rss.trend.interval,
            "footprint_bytes_start": main.start,
            "footprint_bytes_end": main.end,
            "footprint_growth_bytes": main.growth,
            "footprint_slope_bytes_per_s": v.trend.slope,
            "footprint_slope_interval": v.trend.interval,
            "leak": v.leak,
            "plateau": v.plateau,
            "verdict": v.reason,
            "warmup_s": v.warmup_s,
            "held_shm": self.held_json(),
            "cgroup": self.cgroup_json(),
            "dev_shm": self.dev_shm_json(),
            "classes": {c.value: s.to_json() for c, s in self.classes.items()},
            "top_groups": [g.to_json() for g in self.groups],
            "top_regions": [r.to_json() for r in self.regions],
            "device_memory": {"available": True, **self.device.to_json()} if self.device else None,
        }

    def with_true_orphans(self) -> MemorySummary:
        """The /dev/shm files this process does not map narrowed to those no process on the host
        maps or holds open (a scan of every process: for a run's final summary, not each sample)."""
        if self.held_objects is None or not self.held_objects.orphans:
            return self
        held = true_orphans(self.held_objects)
        shm = self.shm
        if shm is not None:
            shm = replace(shm, orphans=len(held.orphans), orphan_bytes=held.orphan_bytes)
        return replace(self, held_objects=held, shm=shm)

    def held_json(self) -> dict:
        doc = self.held_objects.to_json() if self.held_objects is not None else None
        if doc is None:
            doc = (self.shm or ShmTotals()).to_json()
        if self.held is not None:
            doc["bytes_start"] = self.held.start
            doc["slope_bytes_per_s"] = self.held.verdict.trend.slope
        return doc

    def cgroup_json(self) -> dict | None:
        if self.cgroup is None:
            return None
        doc = self.cgroup.to_json()
        doc["limit_bytes"] = self.cgroup_charge.limit if self.cgroup_charge else self.cgroup.limit_bytes
        if self.cgroup_charge is not None:
            doc.update(self.cgroup_charge.json_fields())
        else:
            doc["time_to_limit_s"] = None
        return doc

    def dev_shm_json(self) -> dict | None:
        if self.dev_shm is None:
            return None
        doc = self.dev_shm.to_json()
        if self.dev_shm_charge is not None:
            doc.update(self.dev_shm_charge.json_fields())
            doc["time_to_full_s"] = doc.pop("time_to_limit_s")
        else:
            doc["time_to_full_s"] = None
        return doc


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
    complete = len(history.footprint) == len(history)
    held = series(history.held) if complete and any(history.held) else None
    cgroup = dev_shm = None
    if history.cgroup is not None and len(history.cgroup_usage) == len(history):
        cgroup = ChargeSummary.of(series(history.cgroup_usage), history.cgroup.limit_bytes)
    if history.dev_shm is not None and len(history.dev_shm_used) == len(history):
        dev_shm = ChargeSummary.of(series(history.dev_shm_used), history.dev_shm.size_bytes)
    rss = series(history.rss)
    return MemorySummary(
        pid,
        history.samples or len(history),
        history.duration_s,
        rss,
        classes,
        groups,
        regions,
        device,
        (series(history.footprint) if history.footprint != history.rss else rss) if complete else None,
        held,
        history.shm,
        history.held_objects,
        history.cgroup,
        cgroup,
        history.dev_shm,
        dev_shm,
    )
