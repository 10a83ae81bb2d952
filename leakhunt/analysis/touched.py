"""Growth attributed by first touch: the code whose page faults filled the regions that grew.

Used by the correlator for the growth no traced mapping explains: regions mapped before tracing
began, arenas grown with mprotect or brk, segments an allocator reserved and commits by touching.
Each growing region's growth goes to the code that faulted its pages in (trace.faults), in
proportion to the pages each faulted there. The fault source starts some seconds into a run (when
the mmaps do not explain the growth), so it sees a sample of the faults: once it saw at least
SAMPLE_ENOUGH of a region's growth, the whole growth is shared out in those proportions; before
that the region is left to the other evidence (a traced mapping, the arena shape).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from leakhunt.analysis.culprits import by_id, match
from leakhunt.proc.classes import CLASSES, RegionClass
from leakhunt.proc.growth import held_between
from leakhunt.proc.smaps import Snapshot
from leakhunt.trace.faults import BUCKET_SHIFT, FaultView, Site, Toucher, allocators_by_caller

PAGE = 4096
BUCKET = 1 << BUCKET_SHIFT
#: Faulted pages, as a share of a region's growth, that stand for all of it.
SAMPLE_ENOUGH = 0.25
#: Region classes whose growth faults can explain (private anonymous memory and the brk heap).
TOUCHED_CLASSES = (RegionClass.ANON, RegionClass.HEAP)


def _label(frame) -> tuple[str, str]:
    library = (frame.module or "?").rsplit("/", 1)[-1]
    return library, frame.symbol or f"+{frame.offset:#x}"


def touched(
    before: Snapshot, after: Snapshot, view: FaultView, pid: int, covered: set[int]
) -> tuple[dict[tuple, list], dict[int, float]]:
    """(library, symbol, class) -> [bytes, pages faulted, Toucher, allocators, Counter of the
    bytes it filled in each region (by index in ``after``)]; and the regions the faults explained
    (some of) the growth of, with their growth."""
    by_bucket: dict[int, list[tuple[Site, float]]] = defaultdict(list)
    for (p, site, bucket), pages in view.pages.items():
        if p == pid and pages > 0:
            by_bucket[bucket].append((site, pages))
    out: dict[tuple, list] = {}
    used: dict[int, float] = {}
    if not by_bucket:
        return out, used
    codes = [CLASSES.index(c) for c in TOUCHED_CLASSES]
    rows = [i for i in np.flatnonzero(np.isin(after.classes, codes)).tolist() if i not in covered]
    if not rows:
        return out, used
    idx = np.array(rows)
    growth = after.rss[idx].astype(np.float64) - held_between(before, after.start[idx], after.end[idx])
    for i, g in zip(rows, growth.tolist()):
        if g <= 0:
            continue
        lo, hi = int(after.start[i]), int(after.end[i])
        per_site: Counter = Counter()
        for b in range(lo >> BUCKET_SHIFT, ((hi - 1) >> BUCKET_SHIFT) + 1):
            entries = by_bucket.get(b)
            if not entries:
                continue
            overlap = (min(hi, (b + 1) << BUCKET_SHIFT) - max(lo, b << BUCKET_SHIFT)) / BUCKET
            for site, pages in entries:
                per_site[site] += pages * overlap
        faulted = sum(per_site.values())
        if faulted * PAGE < SAMPLE_ENOUGH * g:
            continue  # too little seen yet to speak for this region
        explained = g
        used[i] = g
        klass = CLASSES[after.classes[i]]
        for site, pages in per_site.items():
            touchers = view.touchers.get((pid, site))
            if not touchers:
                continue
            n = sum(touchers.values())
            for toucher, k in touchers.items():
                weight = pages * k / n
                key = (*_label(toucher.caller), klass)
                acc = out.setdefault(key, [0.0, 0.0, toucher, set(), Counter()])
                acc[0] += explained * weight / faulted
                acc[1] += weight
                acc[4][i] += explained * weight / faulted
                # the stack through the allocator says more than a memset's
                if (bool(toucher.allocator), len(toucher.stack.frames)) > (
                    bool(acc[2].allocator),
                    len(acc[2].stack.frames),
                ):
                    acc[2] = toucher
    through = allocators_by_caller(view)  # every exemplar's allocator, live pages or not
    for (library, symbol, _klass), acc in out.items():
        acc[3] |= through.get((library, symbol), (set(), None))[0]
    return out, used


#: Allocator families (trace.faults.allocator_of) and the known culprit that advises on each.
ALLOCATOR_CULPRITS = {
    "jemalloc": "jemalloc",
    "mimalloc": "mimalloc",
    "tcmalloc": "tcmalloc",
    "glibc malloc": "glibc-malloc",
    "pymalloc": "python-heap",
}


def known_for(toucher: Toucher, klass: RegionClass, allocators: set[str] = frozenset()):
    """What the caller's own code is known for, else the advice for the allocator it went through."""
    known = match(klass, toucher.caller, tuple(toucher.stack.frames))
    for allocator in (toucher.allocator, *sorted(allocators)):
        if known is None and allocator:
            known = by_id(ALLOCATOR_CULPRITS.get(allocator, ""))
    return known
