"""The correlator over a process tree: every process's growth attributed with its own snapshots
and its own traced mappings (addresses mean nothing across address spaces), culprits carrying
the pid they live in, and shares taken of the tree's growth with shared memory counted once.

A /dev/shm segment mapped by two processes grows both their RSS: the tree counts its pages once
(proc.tree.tree_totals) and it is one culprit, named in the process that holds most of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from leakhunt.analysis.correlate import (
    MIN_SHARE,
    NATIVE_GROWTH_CLASSES,
    Attribution,
    Culprit,
    Outstanding,
    correlate,
)
from leakhunt.analysis.verdict import MIN_SLOPE
from leakhunt.proc.classes import RegionClass
from leakhunt.proc.smaps import Snapshot
from leakhunt.proc.tree import tree_totals
from leakhunt.trace.faults import FaultView


@dataclass(frozen=True)
class ProcessEvidence:
    """What one process of the tree contributes: its first and latest snapshots in the window,
    the traced mappings it still holds, and its own RSS verdict."""

    pid: int
    before: Snapshot
    after: Snapshot
    outstanding: Sequence[Outstanding]
    duration_s: float
    leak: bool


def correlate_tree(
    processes: Sequence[ProcessEvidence],
    duration_s: float,
    min_share: float = MIN_SHARE,
    min_slope: float = MIN_SLOPE,
    faults: FaultView | None = None,
) -> Attribution:
    """Attribute the native growth of the live processes of a tree.

    When some processes are judged leaking (ProcessEvidence.leak), only their growth is accused:
    a neighbour's warm-up is not a culprit because the tree as a whole leaks.
    """
    if len(processes) == 1:  # a tree of one: nothing shared with anyone to count once
        p = processes[0]
        return correlate(
            p.before,
            p.after,
            p.outstanding,
            duration_s,
            pid=p.pid,
            min_share=min_share,
            min_slope=min_slope,
            faults=faults,
        )
    ca = tree_totals([p.before for p in processes]).classes
    cb = tree_totals([p.after for p in processes]).classes
    by_class = {c: cb[c] - ca[c] for c in NATIVE_GROWTH_CLASSES}
    total = sum(max(0, g) for g in by_class.values())
    leaking = {p.pid for p in processes if p.leak}
    culprits: list[Culprit] = []
    for p in processes:
        if leaking and p.pid not in leaking:
            continue
        culprits += correlate(
            p.before,
            p.after,
            p.outstanding,
            p.duration_s,
            pid=p.pid,
            min_share=0.0,
            min_slope=0.0,
            faults=faults,
        ).culprits
    culprits = [replace(c, share=c.bytes / total if total > 0 else 0.0) for c in shared_once(culprits)]
    culprits = [c for c in culprits if c.share >= min_share and c.slope >= min_slope]
    culprits.sort(key=lambda c: -c.bytes)
    return Attribution(total, by_class, duration_s, culprits)


def shared_once(culprits: list[Culprit]) -> list[Culprit]:
    """Segments of one name pattern found in several processes are the same pages: one culprit,
    in the process holding most of them, the others named in its detail. Two culprits of one
    process are two findings, never merged."""
    out: list[Culprit] = []
    seen: dict[str, int] = {}
    for c in culprits:
        key = _segments(c)
        if key is None or (key in seen and out[seen[key]].pid == c.pid):
            out.append(c)
            continue
        if key not in seen:
            seen[key] = len(out)
            out.append(c)
            continue
        kept = out[seen[key]]
        keep, other = (c, kept) if c.bytes > kept.bytes else (kept, c)
        also = f"also mapped by pid {other.pid}"
        out[seen[key]] = replace(keep, detail=f"{keep.detail}; {also}" if keep.detail else also)
    return out


def _segments(c: Culprit) -> str | None:
    """The shm name pattern a culprit stands for (traced or found by name), else None."""
    if c.klass is not RegionClass.SHM:
        return None
    if c.detail.startswith("segments "):
        return c.detail.split(";")[0].removeprefix("segments ")
    return c.library if c.library.startswith("/dev/shm/") else None
