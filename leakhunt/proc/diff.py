"""What grew between two snapshots of the same process: classes, (class, path) groups with the
regions that are new, and each growing anonymous range with the library mapped right below it
(a library's .bss and the arenas it grows next to itself show up that way)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leakhunt.proc.classes import CLASSES, RegionClass
from leakhunt.proc.growth import GroupKey, group_path, groups, range_growth
from leakhunt.proc.smaps import Snapshot

FILE_CLASSES = (RegionClass.LIB, RegionClass.FILE)


@dataclass(frozen=True)
class GroupGrowth:
    klass: RegionClass
    path: str
    rss_before: int
    rss_after: int
    regions_before: int
    regions_after: int
    new_regions: int

    @property
    def growth(self) -> int:
        return self.rss_after - self.rss_before

    def to_json(self) -> dict:
        return {
            "class": self.klass.value,
            "path": self.path,
            "rss_growth_bytes": self.growth,
            "rss_bytes_before": self.rss_before,
            "rss_bytes_after": self.rss_after,
            "regions_before": self.regions_before,
            "regions_after": self.regions_after,
            "new_regions": self.new_regions,
        }


@dataclass(frozen=True)
class RangeChange:
    start: int
    end: int
    klass: RegionClass
    path: str
    rss: int
    growth: int
    new: bool
    neighbour: str | None  # the file mapped right below an anonymous range, if any

    def to_json(self) -> dict:
        return {
            "start": hex(self.start),
            "end": hex(self.end),
            "class": self.klass.value,
            "path": self.path,
            "rss_bytes": self.rss,
            "rss_growth_bytes": self.growth,
            "new": self.new,
            "next_to": self.neighbour,
        }


@dataclass(frozen=True)
class SnapshotDiff:
    rss_before: int
    rss_after: int
    classes: dict[RegionClass, tuple[int, int]]  # before, after
    groups: list[GroupGrowth]  # most growth first
    ranges: list[RangeChange]  # the ranges that grew most

    @property
    def growth(self) -> int:
        return self.rss_after - self.rss_before

    def to_json(self) -> dict:
        return {
            "rss_bytes_before": self.rss_before,
            "rss_bytes_after": self.rss_after,
            "rss_growth_bytes": self.growth,
            "classes": {
                c.value: {"rss_growth_bytes": a - b, "rss_bytes_before": b, "rss_bytes_after": a}
                for c, (b, a) in self.classes.items()
            },
            "groups": [g.to_json() for g in self.groups],
            "ranges": [r.to_json() for r in self.ranges],
        }


def _neighbour(snapshot: Snapshot, i: int) -> str | None:
    """The file mapped immediately below region i (adjacent addresses), for anonymous regions."""
    if i == 0 or snapshot.end[i - 1] != snapshot.start[i]:
        return None
    below = CLASSES[snapshot.classes[i - 1]]
    return snapshot.path[i - 1] if below in FILE_CLASSES else None


def diff(before: Snapshot, after: Snapshot, top_ranges: int = 20) -> SnapshotDiff:
    ga, gb = groups(before), groups(after)
    growth = range_growth(before, after)
    new_by_group: dict[GroupKey, int] = {}
    for i in np.flatnonzero(growth.new):
        key = (CLASSES[after.classes[i]], group_path(int(after.classes[i]), after.path[i]))
        new_by_group[key] = new_by_group.get(key, 0) + 1
    rows = []
    for key in set(ga) | set(gb):
        a, b = ga.get(key), gb.get(key)
        rows.append(
            GroupGrowth(
                key[0],
                key[1],
                a.rss if a else 0,
                b.rss if b else 0,
                a.regions if a else 0,
                b.regions if b else 0,
                new_by_group.get(key, 0),
            )
        )
    rows.sort(key=lambda g: (-g.growth, g.klass.value, g.path))
    ca, cb = before.class_totals(), after.class_totals()
    classes = {c: (ca[c], cb[c]) for c in CLASSES if ca[c] or cb[c]}
    ranges = []
    for i in growth.top(top_ranges):
        r = after[i]
        ranges.append(
            RangeChange(
                r.start,
                r.end,
                r.klass,
                r.path,
                r.rss,
                int(growth.growth[i]),
                bool(growth.new[i]),
                _neighbour(after, i) if r.klass is RegionClass.ANON else None,
            )
        )
    return SnapshotDiff(before.total_rss, after.total_rss, classes, rows, ranges)
