"""The correlator: which caller's mappings hold the memory that grew.

Joins the tracer's outstanding mappings (address ranges returned by mmap and not unmapped since)
with what the same addresses held in two smaps snapshots, and attributes the growth to callers
(library, symbol, stack). Growth the traced mappings do not cover is reported as unexplained,
never spread over the culprits. Memory classes a tracer does not see get their own evidence:
/dev/shm growth by segment-name pattern, [heap] growth pointed at malloc, GPU driver mappings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from leakhunt.analysis.culprits import KnownCulprit, match
from leakhunt.proc.classes import CLASSES, RegionClass
from leakhunt.proc.growth import held_between
from leakhunt.proc.smaps import Snapshot
from leakhunt.trace.events import Frame, Stack
from leakhunt.units import format_bytes, format_rate

#: Classes whose growth a mapping tracer can explain, and those we explain by other evidence.
TRACED_CLASSES = (RegionClass.ANON, RegionClass.SHM, RegionClass.PINNED)
NATIVE_GROWTH_CLASSES = (RegionClass.ANON, RegionClass.SHM, RegionClass.PINNED, RegionClass.HEAP, RegionClass.GPU)
#: A culprit must explain at least this share of the growth to be accused.
MIN_SHARE = 0.05


@dataclass(frozen=True)
class Outstanding:
    """One traced mapping still held at the end of the window."""

    pid: int
    start: int
    length: int
    caller: Frame | None
    stack: Stack | None = None
    ts: float = 0.0


@dataclass(frozen=True)
class Culprit:
    library: str
    symbol: str
    klass: RegionClass
    bytes: int                      # growth this culprit explains over the window
    slope: float                    # bytes per second
    share: float                    # of the total native growth
    evidence: str                   # "traced mmap", "shm segment names", "heap"
    stack: tuple[str, ...] = ()
    stack_partial: bool = True
    known: KnownCulprit | None = None
    pid: int | None = None
    mappings: int = 0               # outstanding mappings (or segments) behind it

    @property
    def title(self) -> str:
        return f"{self.library}!{self.symbol}" if self.symbol else self.library

    def to_json(self) -> dict:
        return {"library": self.library, "symbol": self.symbol, "class": self.klass.value,
                "stack": list(self.stack), "stack_partial": self.stack_partial, "bytes": self.bytes,
                "slope_bytes_per_s": self.slope, "share": self.share, "evidence": self.evidence,
                "known": self.known.to_json() if self.known else None,
                "remedies": list(self.known.remedies) if self.known else [], "pid": self.pid,
                "mappings": self.mappings}


@dataclass(frozen=True)
class Attribution:
    growth: int                                 # native growth over the window (bytes)
    growth_by_class: dict[RegionClass, int]
    duration_s: float
    culprits: list[Culprit] = field(default_factory=list)

    @property
    def explained(self) -> int:
        return sum(c.bytes for c in self.culprits)

    @property
    def explained_fraction(self) -> float:
        return min(1.0, self.explained / self.growth) if self.growth > 0 else 0.0

    @property
    def unexplained(self) -> int:
        return max(0, self.growth - self.explained)

    def sentence(self) -> str:
        if not self.culprits:
            return "no culprit: the growth is not explained by any traced mapping or known pattern"
        top = self.culprits[0]
        what = {RegionClass.ANON: "anonymous memory", RegionClass.SHM: "/dev/shm memory",
                RegionClass.PINNED: "pinned host memory", RegionClass.HEAP: "heap memory",
                RegionClass.GPU: "GPU driver mappings"}.get(top.klass, f"{top.klass.value} memory")
        by = f"mapped by {top.library}'s {top.symbol}" if top.evidence == "traced mmap" and top.symbol else \
            f"in {top.library}" if top.evidence != "traced mmap" else f"mapped by {top.library}"
        text = f"{top.share:.0%} of native memory growth is {what} {by} ({format_rate(top.slope)})"
        if top.known and top.known.remedies:
            text += f"; {top.known.remedies[0]}"
        return text

    def to_json(self) -> dict:
        return {"growth_bytes": self.growth, "explained_bytes": self.explained,
                "unexplained_bytes": self.unexplained, "explained_fraction": self.explained_fraction,
                "growth_by_class": {c.value: v for c, v in self.growth_by_class.items()},
                "culprits": [c.to_json() for c in self.culprits], "verdict": self.sentence()}


def _class_at(snapshot: Snapshot, addresses: np.ndarray) -> list[RegionClass | None]:
    k = np.searchsorted(snapshot.start, addresses, side="right") - 1
    out: list[RegionClass | None] = []
    for a, i in zip(addresses.tolist(), k.tolist()):
        out.append(CLASSES[snapshot.classes[i]] if i >= 0 and a < int(snapshot.end[i]) else None)
    return out


def _traced(before: Snapshot, after: Snapshot, outstanding: Sequence[Outstanding], duration: float,
            total: int) -> list[Culprit]:
    if not outstanding:
        return []
    lo = np.array([o.start for o in outstanding], np.uint64)
    hi = lo + np.array([o.length for o in outstanding], np.uint64)
    growth = held_between(after, lo, hi) - held_between(before, lo, hi)
    classes = _class_at(after, lo)
    by_caller: dict[tuple, list] = {}
    for o, g, klass in zip(outstanding, growth.tolist(), classes):
        if klass not in TRACED_CLASSES:
            continue  # unmapped again in the meantime, or not native memory
        f = o.caller
        key = (o.pid, f.library if f else "?", (f.symbol or "") if f else "", klass)
        acc = by_caller.setdefault(key, [0.0, 0, o])
        acc[0] += g
        acc[1] += 1
        if o.stack is not None and (acc[2].stack is None or len(o.stack.frames) > len(acc[2].stack.frames)):
            acc[2] = o  # keep the deepest stack as the representative one
    culprits = []
    for (pid, library, symbol, klass), (g, n, rep) in by_caller.items():
        if g <= 0:
            continue
        stack = rep.stack.frames if rep.stack else ((rep.caller,) if rep.caller else ())
        known = match(klass, rep.caller, tuple(stack))
        culprits.append(Culprit(library, symbol, klass, int(g), g / duration if duration > 0 else 0.0,
                                g / total if total > 0 else 0.0, "traced mmap", tuple(str(f) for f in stack),
                                rep.stack.partial if rep.stack else True, known, pid, n))
    return culprits


_DIGITS = re.compile(r"\d+")


def shm_pattern(path: str) -> str:
    """'/dev/shm/sgl_shm_mm_8812_3' -> 'sgl_shm_mm_*_*': segments of one kind share a pattern."""
    name = path.rsplit("/", 1)[-1].replace(" (deleted)", "")
    return _DIGITS.sub("*", name)


def _shm(before: Snapshot, after: Snapshot, duration: float, total: int, covered: set[int],
         pid: int | None) -> list[Culprit]:
    """Growth of /dev/shm segments, by name pattern, for the ranges no traced mapping explained."""
    shm_code = CLASSES.index(RegionClass.SHM)
    rows = np.flatnonzero(after.classes == shm_code)
    if not len(rows):
        return []
    held = held_between(before, after.start[rows], after.end[rows])
    by_pattern: dict[str, list] = {}
    for i, h in zip(rows.tolist(), held.tolist()):
        if i in covered:
            continue
        g = int(after.rss[i]) - h
        path = after.path[i]
        if g <= 0 or not path.startswith(("/dev/shm/", "memfd:", "/SYSV")):
            continue
        acc = by_pattern.setdefault(shm_pattern(path), [0, 0, path])
        acc[0] += g
        acc[1] += 1
    return [Culprit(f"/dev/shm/{pattern}", "", RegionClass.SHM, int(g), g / duration if duration > 0 else 0.0,
                    g / total if total > 0 else 0.0, "shm segment names", (path,), True,
                    match(RegionClass.SHM, shm_name=path), pid, n)
            for pattern, (g, n, path) in by_pattern.items()]


def _by_class(klass: RegionClass, growth: int, duration: float, total: int, pid: int | None,
              label: str, evidence: str) -> Culprit:
    known = match(klass, Frame(0, "libc.so.6", "malloc") if klass is RegionClass.HEAP else None)
    return Culprit(label, "", klass, growth, growth / duration if duration > 0 else 0.0,
                   growth / total if total > 0 else 0.0, evidence, (), True, known, pid)


def correlate(before: Snapshot, after: Snapshot, outstanding: Sequence[Outstanding], duration_s: float,
              pid: int | None = None, min_share: float = MIN_SHARE) -> Attribution:
    """Attribute the native growth between two snapshots of one process."""
    ca, cb = before.class_totals(), after.class_totals()
    by_class = {c: cb[c] - ca[c] for c in NATIVE_GROWTH_CLASSES}
    total = sum(max(0, g) for g in by_class.values())
    culprits = _traced(before, after, outstanding, duration_s, total)

    # Ranges a traced mapping already covers must not be counted again by name.
    covered: set[int] = set()
    if outstanding:
        lo = np.array([o.start for o in outstanding], np.uint64)
        for i in np.searchsorted(after.start, lo, side="right") - 1:
            if i >= 0:
                covered.add(int(i))
    culprits += _shm(before, after, duration_s, total, covered, pid)
    if by_class[RegionClass.HEAP] > 0:
        culprits.append(_by_class(RegionClass.HEAP, by_class[RegionClass.HEAP], duration_s, total, pid,
                                  "[heap] (malloc main arena)", "heap"))
    if by_class[RegionClass.GPU] > 0:
        culprits.append(_by_class(RegionClass.GPU, by_class[RegionClass.GPU], duration_s, total, pid,
                                  "GPU driver mappings", "gpu mappings"))
    culprits = [c for c in culprits if c.share >= min_share]
    culprits.sort(key=lambda c: -c.bytes)
    return Attribution(total, by_class, duration_s, culprits)


def describe(attribution: Attribution) -> str:
    return (f"{format_bytes(attribution.growth)} of native growth, {attribution.explained_fraction:.0%} explained"
            f"{'' if not attribution.unexplained else f', {format_bytes(attribution.unexplained)} unexplained'}")
