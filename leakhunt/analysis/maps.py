"""One classified snapshot, as `leakhunt maps` shows it: totals, each class, and the groups
(class and path) sorted by RSS. Typed, so the renderer and --json read the same thing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leakhunt.proc.classes import CLASSES, RegionClass
from leakhunt.proc.growth import groups
from leakhunt.proc.smaps import Snapshot


@dataclass(frozen=True)
class ClassLine:
    klass: RegionClass
    rss_bytes: int
    pss_bytes: int
    swap_bytes: int
    regions: int

    def to_json(self) -> dict:
        return {
            "rss_bytes": self.rss_bytes,
            "pss_bytes": self.pss_bytes,
            "swap_bytes": self.swap_bytes,
            "regions": self.regions,
        }


@dataclass(frozen=True)
class GroupLine:
    klass: RegionClass
    path: str
    rss_bytes: int
    pss_bytes: int
    size_bytes: int
    regions: int

    def to_json(self) -> dict:
        return {
            "class": self.klass.value,
            "path": self.path,
            "rss_bytes": self.rss_bytes,
            "pss_bytes": self.pss_bytes,
            "size_bytes": self.size_bytes,
            "regions": self.regions,
        }


@dataclass(frozen=True)
class MapsSummary:
    source: str
    rss_bytes: int
    pss_bytes: int
    swap_bytes: int
    regions: int
    gpu_process: bool
    classes: tuple[ClassLine, ...]  # the classes present, in CLASSES order
    groups: tuple[GroupLine, ...]  # by RSS, largest first; the first ``top`` when top > 0
    top: int

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "rss_bytes": self.rss_bytes,
            "pss_bytes": self.pss_bytes,
            "swap_bytes": self.swap_bytes,
            "regions": self.regions,
            "gpu_process": self.gpu_process,
            "classes": {c.klass.value: c.to_json() for c in self.classes},
            "groups": [g.to_json() for g in self.groups],
        }


def summarize_maps(snap: Snapshot, label: str, top: int = 0) -> MapsSummary:
    g = sorted(groups(snap).items(), key=lambda kv: (-kv[1].rss, kv[0][0].value, kv[0][1]))
    counts = np.bincount(snap.classes, minlength=len(CLASSES)).tolist() if len(snap) else [0] * len(CLASSES)
    rss, pss, swap = snap.class_totals(), snap.class_totals("Pss"), snap.class_totals("Swap")
    return MapsSummary(
        source=label,
        rss_bytes=snap.total_rss,
        pss_bytes=snap.total("Pss"),
        swap_bytes=snap.total("Swap"),
        regions=len(snap),
        gpu_process=snap.gpu_process,
        classes=tuple(
            ClassLine(klass=c, rss_bytes=rss[c], pss_bytes=pss[c], swap_bytes=swap[c], regions=n)
            for c, n in zip(CLASSES, counts)
            if n
        ),
        groups=tuple(
            GroupLine(
                klass=k[0],
                path=k[1],
                rss_bytes=s.rss,
                pss_bytes=s.pss,
                size_bytes=s.size,
                regions=s.regions,
            )
            for k, s in (g[:top] if top else g)
        ),
        top=top,
    )
