"""The correlator: which caller's mappings hold the memory that grew.

Joins the tracer's outstanding mappings (address ranges returned by mmap and not unmapped since)
with what the same addresses held in two smaps snapshots, and attributes the growth to callers
(library, symbol, stack). Growth the traced mappings do not cover is reported as unexplained,
never spread over the culprits. Memory classes a tracer does not see get their own evidence:
/dev/shm growth by segment-name pattern, [heap] growth pointed at malloc, GPU driver mappings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from leakhunt.analysis.culprits import KnownCulprit, match
from leakhunt.analysis.touched import known_for, touched
from leakhunt.analysis.verdict import MIN_SLOPE
from leakhunt.proc.classes import CLASSES, RegionClass
from leakhunt.proc.growth import held_between, shm_pattern
from leakhunt.proc.shmem import object_pattern
from leakhunt.proc.smaps import Snapshot
from leakhunt.trace.events import Frame, Outstanding
from leakhunt.trace.faults import FaultView, allocator_of
from leakhunt.units import format_rate, format_share

#: Classes whose growth a mapping tracer can explain, and those we explain by other evidence.
TRACED_CLASSES = (RegionClass.ANON, RegionClass.SHM, RegionClass.PINNED, RegionClass.HEAP)
NATIVE_GROWTH_CLASSES = (
    RegionClass.ANON,
    RegionClass.SHM,
    RegionClass.PINNED,
    RegionClass.HEAP,
    RegionClass.GPU,
)
#: A culprit must explain at least this share of the growth to be accused, and grow faster than
#: the verdict's noise floor (a tiny total makes any crumb a big share).
MIN_SHARE = 0.05
#: glibc aligns every non-main malloc arena heap to HEAP_MAX_SIZE (2 * DEFAULT_MMAP_THRESHOLD_MAX,
#: 64 MiB on 64-bit) and grows it in place with mprotect: an anonymous region that starts on that
#: alignment and, with its PROT_NONE reserve, spans at most that much is an arena heap.
ARENA_HEAP = 64 * 2**20


@dataclass(frozen=True)
class Culprit:
    library: str
    symbol: str
    klass: RegionClass
    bytes: int  # growth this culprit explains over the window
    slope: float  # bytes per second
    share: float  # of the total native growth
    evidence: str  # "traced mmap", "shm segment names", "heap"
    stack: tuple[str, ...] = ()
    stack_partial: bool = True
    known: KnownCulprit | None = None
    pid: int | None = None
    mappings: int = 0  # outstanding mappings (or segments) behind it
    detail: str = ""  # e.g. the /dev/shm name pattern of the segments it maps
    origin: str = ""  # the first frame outside the C library, when the caller is in it
    created_by: tuple[dict, ...] = ()  # shared objects: who created them (trace.creators.Creator.to_json)
    # First-touch culprits: who mapped the regions it filled ("libX.so!fn", or "before tracing"),
    # and the share of those regions' growth that it filled.
    mapped_by: str = ""
    filled: float = 0.0

    @property
    def segments(self) -> str | None:
        """The name pattern of the shared objects behind this culprit, when it stands for some."""
        if self.detail.startswith("segments "):
            return self.detail.split(";")[0].removeprefix("segments ")
        return None

    @property
    def title(self) -> str:
        return f"{self.library}!{self.symbol}" if self.symbol else self.library

    def to_json(self) -> dict:
        return {
            "library": self.library,
            "symbol": self.symbol,
            "class": self.klass.value,
            "stack": list(self.stack),
            "stack_partial": self.stack_partial,
            "bytes": self.bytes,
            "slope_bytes_per_s": self.slope,
            "share": self.share,
            "evidence": self.evidence,
            "known": self.known.to_json() if self.known else None,
            "remedies": list(self.known.remedies) if self.known else [],
            "pid": self.pid,
            "mappings": self.mappings,
            "detail": self.detail,
            "origin": self.origin,
            "created_by": list(self.created_by),
            "mapped_by": self.mapped_by or None,
            "filled_fraction": self.filled if self.mapped_by else None,
        }

    @classmethod
    def from_json(cls, doc: dict) -> Culprit:
        """Read back what to_json() wrote (a recording's verdict stream or summary). Keys a newer
        writer adds are ignored and missing ones default, so old recordings still read."""
        known = doc.get("known")
        if isinstance(known, dict):
            # The remedies a culprit carries are its known culprit's (to_json writes them twice).
            known = KnownCulprit.from_json(
                {**known, "remedies": known.get("remedies") or doc.get("remedies")}
            )
        klass = doc.get("class")
        return cls(
            library=str(doc.get("library", "?")),
            symbol=str(doc.get("symbol") or ""),
            klass=RegionClass(klass) if klass in RegionClass._value2member_map_ else RegionClass.ANON,
            bytes=int(doc.get("bytes") or 0),
            slope=float(doc.get("slope_bytes_per_s") or 0.0),
            share=float(doc.get("share") or 0.0),
            evidence=str(doc.get("evidence", "")),
            stack=tuple(str(f) for f in doc.get("stack") or ()),
            stack_partial=bool(doc.get("stack_partial", True)),
            known=known if isinstance(known, KnownCulprit) else None,
            pid=doc.get("pid"),
            mappings=int(doc.get("mappings") or 0),
            detail=str(doc.get("detail") or ""),
            origin=str(doc.get("origin") or ""),
            created_by=tuple(c for c in doc.get("created_by") or () if isinstance(c, dict)),
            mapped_by=str(doc.get("mapped_by") or ""),
            filled=float(doc.get("filled_fraction") or 0.0),
        )


@dataclass(frozen=True)
class Attribution:
    growth: int  # native growth over the window (bytes)
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
        what = {
            RegionClass.ANON: "anonymous memory",
            RegionClass.SHM: "shared memory (tmpfs)",
            RegionClass.PINNED: "pinned host memory",
            RegionClass.HEAP: "heap memory",
            RegionClass.GPU: "GPU driver mappings",
        }.get(top.klass, f"{top.klass.value} memory")
        if top.evidence == "page faults":
            by = f"filled by {top.library}'s {top.symbol} (first touch, by its page faults)"
            if top.mapped_by:
                mapped = top.mapped_by if top.mapped_by == "before tracing" else f"by {top.mapped_by}"
                by = f"mapped {mapped}, {format_share(top.filled)} of it {by}"
        elif top.evidence.startswith("traced"):
            by = f"mapped by {top.library}'s {top.symbol}" if top.symbol else f"mapped by {top.library}"
            if top.origin:
                by += f" (called from {top.origin.split('+')[0]})"
        else:
            by = f"in {top.library}"
        text = f"{format_share(top.share)} of native memory growth is {what} {by} ({format_rate(top.slope)})"
        if top.created_by:
            c = top.created_by[0]
            who = (
                "itself"
                if c["pid"] == top.pid
                else f"pid {c['pid']} ({c['command'].split(' ')[0].rsplit('/', 1)[-1]})"
            )
            text += f", created by {who}" + (f" via {c['origin'].split('(')[0]}" if c["origin"] else "")
            if len(top.created_by) > 1:
                text += (
                    f" and {len(top.created_by) - 1} other process{'es' if len(top.created_by) > 2 else ''}"
                )
        if "; " in top.detail:
            text += f", {top.detail.split('; ', 1)[1]}"
        if top.known and top.known.remedies:
            text += f"; {top.known.remedies[0]}"
        return text

    def to_json(self) -> dict:
        return {
            "growth_bytes": self.growth,
            "explained_bytes": self.explained,
            "unexplained_bytes": self.unexplained,
            "explained_fraction": self.explained_fraction,
            "growth_by_class": {c.value: v for c, v in self.growth_by_class.items()},
            "culprits": [c.to_json() for c in self.culprits],
            "verdict": self.sentence(),
            "duration_s": self.duration_s,
        }

    @classmethod
    def from_json(cls, doc: dict) -> Attribution:
        """Read back what to_json() wrote; sentence() and the fractions are derived again."""
        by_class = doc.get("growth_by_class") or {}
        return cls(
            growth=int(doc.get("growth_bytes") or 0),
            growth_by_class={
                RegionClass(k): int(v) for k, v in by_class.items() if k in RegionClass._value2member_map_
            },
            duration_s=float(doc.get("duration_s") or 0.0),
            culprits=[Culprit.from_json(c) for c in doc.get("culprits") or () if isinstance(c, dict)],
        )


def _traced(
    before: Snapshot, after: Snapshot, outstanding: Sequence[Outstanding], duration: float, total: int
) -> list[Culprit]:
    if not outstanding:
        return []
    lo = np.array([o.start for o in outstanding], np.uint64)
    hi = lo + np.array([o.length for o in outstanding], np.uint64)
    growth = _traced_growth(before, after, lo, hi)
    where = _region_at(after, lo)
    by_caller: dict[tuple, list] = {}
    for o, g, i in zip(outstanding, growth.tolist(), where):
        klass = CLASSES[after.classes[i]] if i is not None else None
        if klass not in TRACED_CLASSES:
            continue  # unmapped again in the meantime, or not memory we attribute
        f = o.caller
        # Segments of one kind (one name pattern) mapped by one caller are one culprit.
        pattern = segment_pattern(after.path[i]) if klass is RegionClass.SHM else ""
        key = (o.pid, f.library if f else "?", (f.symbol or "") if f else "", klass, pattern)
        acc = by_caller.setdefault(key, [0.0, 0, o, after.path[i], 0])
        acc[0] += g
        acc[1] += 1
        acc[4] += after.path[i].endswith(" (deleted)")
        if o.stack is not None and (acc[2].stack is None or len(o.stack.frames) > len(acc[2].stack.frames)):
            acc[2] = o  # keep the deepest stack as the representative one
    culprits = []
    for (pid, library, symbol, klass, pattern), (g, n, rep, path, deleted) in by_caller.items():
        if g <= 0:
            continue
        stack = rep.stack.frames if rep.stack else ((rep.caller,) if rep.caller else ())
        known = match(klass, rep.caller, tuple(stack), shm_name=path if pattern else None)
        origin = (
            next((str(f) for f in stack if not _in_libc(f)), "")
            if rep.caller and _in_libc(rep.caller)
            else ""
        )
        culprits.append(
            Culprit(
                library,
                symbol,
                klass,
                int(g),
                g / duration if duration > 0 else 0.0,
                g / total if total > 0 else 0.0,
                "traced mmap",
                tuple(str(f) for f in stack),
                rep.stack.partial if rep.stack else True,
                known,
                pid,
                n,
                _segments_detail(
                    f"/dev/shm/{pattern}" if path.startswith("/dev/shm/") else object_pattern(path),
                    n,
                    deleted,
                )
                if pattern
                else "",
                origin,
            )
        )
    return culprits


def _segments_detail(pattern: str, n: int, deleted: int) -> str:
    """'segments /dev/shm/x_*' and, when some have no name left, how many only mappings hold."""
    if not deleted:
        return f"segments {pattern}"
    held = "all deleted" if deleted == n else f"{deleted} deleted"
    return f"segments {pattern}; {n} object{'s' if n != 1 else ''}, {held}: only the mappings keep them"


def _traced_growth(before: Snapshot, after: Snapshot, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Growth each traced range explains.

    The kernel merges adjacent anonymous mappings into one region, and smaps tells a region's
    resident total, not which of its pages are resident. A region's growth (what its addresses
    hold now minus what they held before) goes first to the traced ranges inside it, in proportion
    to how much of the region each covers, up to their combined length; growth beyond that is the
    untraced part's and stays unexplained.
    """
    n = len(after)
    if n == 0 or len(lo) == 0:
        return np.zeros(len(lo))
    region_growth = np.maximum(
        after.rss.astype(np.float64) - held_between(before, after.start, after.end), 0.0
    )
    starts, ends = after.start.astype(np.int64), after.end.astype(np.int64)
    lo_i, hi_i = lo.astype(np.int64), hi.astype(np.int64)
    first = np.searchsorted(starts, lo_i, side="right") - 1
    last = np.searchsorted(starts, hi_i - 1, side="right") - 1
    pieces_m, pieces_r, pieces_len = [], [], []
    simple = (first == last) & (first >= 0)
    idx = np.flatnonzero(simple)
    r = first[idx]
    pieces_m.append(idx)
    pieces_r.append(r)
    pieces_len.append(np.clip(np.minimum(hi_i[idx], ends[r]) - np.maximum(lo_i[idx], starts[r]), 0, None))
    for m in np.flatnonzero(~simple & (last >= 0)).tolist():  # a range split over several regions
        rs = np.arange(max(first[m], 0), last[m] + 1)
        pieces_m.append(np.full(len(rs), m))
        pieces_r.append(rs)
        pieces_len.append(np.clip(np.minimum(hi_i[m], ends[rs]) - np.maximum(lo_i[m], starts[rs]), 0, None))
    pm, pr, pl = (np.concatenate(x) for x in (pieces_m, pieces_r, pieces_len))
    covered = np.bincount(pr, weights=pl, minlength=n)
    given = np.minimum(region_growth, covered)
    share = np.divide(pl, covered[pr], out=np.zeros(len(pl)), where=covered[pr] > 0)
    return np.bincount(pm, weights=share * given[pr], minlength=len(lo))


def _in_libc(frame: Frame) -> bool:
    """malloc's own frames (sbrk, sysmalloc...) name the mechanism, not who asked for memory."""
    return frame.library.startswith(("libc.so", "libc-", "ld-linux"))


def _region_at(snapshot: Snapshot, addresses: np.ndarray) -> list[int | None]:
    """Index of the region holding each address, None where nothing is mapped."""
    k = np.searchsorted(snapshot.start, addresses, side="right") - 1
    return [
        i if i >= 0 and a < int(snapshot.end[i]) else None for a, i in zip(addresses.tolist(), k.tolist())
    ]


def segment_pattern(path: str) -> str:
    """'/dev/shm/sgl_shm_mm_8812_3' -> 'sgl_shm_mm_*_*': segments of one kind share a pattern."""
    return shm_pattern(path).rsplit("/", 1)[-1].replace(" (deleted)", "")


def _shm(
    before: Snapshot, after: Snapshot, duration: float, total: int, covered: set[int], pid: int | None
) -> list[Culprit]:
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
        if g <= 0 or not path.startswith(("/dev/shm/", "memfd:", "/memfd:", "/SYSV")):
            continue
        acc = by_pattern.setdefault(segment_pattern(path), [0, 0, path, 0])
        acc[0] += g
        acc[1] += 1
        acc[3] += path.endswith(" (deleted)")
    return [
        Culprit(
            f"/dev/shm/{pattern}" if path.startswith("/dev/shm/") else object_pattern(path),
            "",
            RegionClass.SHM,
            int(g),
            g / duration if duration > 0 else 0.0,
            g / total if total > 0 else 0.0,
            "shm segment names",
            (path,),
            True,
            match(RegionClass.SHM, shm_name=path),
            pid,
            n,
            _segments_detail(pattern, n, d),
        )
        for pattern, (g, n, path, d) in by_pattern.items()
    ]


def _arenas(
    before: Snapshot, after: Snapshot, duration: float, total: int, covered: set[int], pid: int | None
) -> list[Culprit]:
    """Growth of glibc malloc arena heaps that no traced mapping explains (mapped before tracing
    began: arenas grow inside their 64 MiB reservation with mprotect, not with new mmaps)."""
    anon = CLASSES.index(RegionClass.ANON)
    grown, n = 0, 0
    for i in np.flatnonzero((after.classes == anon) & (after.start % ARENA_HEAP == 0)).tolist():
        if i in covered:
            continue
        end = int(after.end[i])
        if (
            i + 1 < len(after)
            and int(after.start[i + 1]) == end
            and after.perms[i + 1] == "---p"
            and after.path[i + 1] == ""
        ):
            end = int(after.end[i + 1])  # the arena's PROT_NONE reserve follows it
        if end - int(after.start[i]) > ARENA_HEAP or after.perms[i][:2] != "rw":
            continue
        g = int(after.rss[i]) - int(held_between(before, after.start[i : i + 1], after.end[i : i + 1])[0])
        if g > 0:
            grown += g
            n += 1
    if grown <= 0:
        return []
    return [
        Culprit(
            "glibc malloc arenas",
            "",
            RegionClass.ANON,
            grown,
            grown / duration if duration > 0 else 0.0,
            grown / total if total > 0 else 0.0,
            "arena shape",
            (),
            True,
            match(RegionClass.ANON, Frame(0, "libc.so.6", "new_heap")),
            pid,
            n,
            f"{n} arena heap{'s' if n > 1 else ''} (64 MiB-aligned anonymous regions) mapped before tracing",
        )
    ]


def _mappers(
    after: Snapshot, by_allocator: Sequence[Outstanding], regions: dict[int, float]
) -> tuple[dict[int, str], dict[int, str]]:
    """Who mapped each region the faults explain: the allocator call the tracer saw map it, the
    brk heap, or nobody seen (it was mapped before tracing); and, for a region an allocator
    mapped, that allocator's family (trace.faults.allocator_of)."""
    out = {i: "brk" if CLASSES[after.classes[i]] is RegionClass.HEAP else "before tracing" for i in regions}
    through: dict[int, str] = {}
    if by_allocator:
        at = _region_at(after, np.array([o.start for o in by_allocator], np.uint64))
        for o, i in zip(by_allocator, at):
            if i in out and o.caller is not None:
                c = o.caller
                out[i] = f"{c.library}!{c.symbol}" if c.symbol else c.library
                through[i] = allocator_of(c)  # by_allocator holds allocator calls only
    return out, through


def _touched_culprits(
    found: dict[tuple, list],
    faults: FaultView,
    duration: float,
    total: int,
    pid: int,
    growth: dict[int, float],
    mappers: dict[int, str],
    through: dict[int, str],
) -> list[Culprit]:
    out = []
    for (library, symbol, klass), (g, pages, toucher, allocators, regions) in found.items():
        if g <= 0:
            continue
        by_mapper: Counter = Counter()
        for i, filled in regions.items():
            by_mapper[mappers[i]] += filled
        mapper = by_mapper.most_common(1)[0][0]
        mapped = [i for i in regions if mappers[i] == mapper]
        filled = sum(regions[i] for i in mapped) / max(1.0, sum(growth[i] for i in mapped))
        # The allocator that mapped the regions counts as one the caller went through: a fault
        # inside the allocator's own code (what the exemplars show) can be rare, as for jemalloc's
        # large extents, whose pages only the caller touches.
        allocators = set(allocators) | {through[i] for i in mapped if i in through}
        via = f"; allocator {', '.join(sorted(allocators))}" if allocators else ""
        sampled = " (sampled, scaled)" if faults.sampled else ""
        if not faults.netted:
            sampled += " (faults counted, pages given back not netted out: bpftrace)"
        out.append(
            Culprit(
                library,
                symbol,
                klass,
                int(g),
                g / duration if duration > 0 else 0.0,
                g / total if total > 0 else 0.0,
                "page faults",
                tuple(str(f) for f in toucher.stack.frames),
                toucher.stack.partial,
                known_for(toucher, klass, allocators),
                pid,
                0,
                f"first touched {int(pages)} pages{sampled}{via}",
                mapped_by=mapper,
                filled=min(1.0, filled),
            )
        )
    return out


def _by_class(
    klass: RegionClass, growth: int, duration: float, total: int, pid: int | None, label: str, evidence: str
) -> Culprit:
    known = match(klass, Frame(0, "libc.so.6", "malloc") if klass is RegionClass.HEAP else None)
    return Culprit(
        label,
        "",
        klass,
        growth,
        growth / duration if duration > 0 else 0.0,
        growth / total if total > 0 else 0.0,
        evidence,
        (),
        True,
        known,
        pid,
    )


def correlate(
    before: Snapshot,
    after: Snapshot,
    outstanding: Sequence[Outstanding],
    duration_s: float,
    pid: int | None = None,
    min_share: float = MIN_SHARE,
    min_slope: float = MIN_SLOPE,
    faults: FaultView | None = None,
) -> Attribution:
    """Attribute the native growth between two snapshots of one process. With ``faults`` (the
    page-fault source), growth of anonymous and heap regions no traced mapping covers goes to the
    code that faulted their pages in."""
    ca, cb = before.class_totals(), after.class_totals()
    by_class = {c: cb[c] - ca[c] for c in NATIVE_GROWTH_CLASSES}
    total = sum(max(0, g) for g in by_class.values())
    # With page faults, memory an allocator mapped goes to the code that filled it, when the
    # faults say who that was; the allocator's own mmap is the answer only where they do not.
    by_allocator: list[Outstanding] = []
    if faults is not None and pid is not None:
        by_allocator = [o for o in outstanding if o.caller is not None and allocator_of(o.caller)]
        if by_allocator:
            mine = {id(o) for o in by_allocator}
            outstanding = [o for o in outstanding if id(o) not in mine]
    culprits = _traced(before, after, outstanding, duration_s, total)

    # Ranges a traced mapping already covers must not be counted again by name.
    covered: set[int] = set()
    if outstanding:
        lo = np.array([o.start for o in outstanding], np.uint64)
        covered = {i for i in _region_at(after, lo) if i is not None}
    if faults is not None and pid is not None:
        found, used = touched(before, after, faults, pid, covered)
        covered.update(used)
        mappers, through = _mappers(after, by_allocator, used)
        culprits += _touched_culprits(found, faults, duration_s, total, pid, used, mappers, through)
        rest = [o for o in by_allocator if _region_at(after, np.array([o.start], np.uint64))[0] not in used]
        culprits += _traced(before, after, rest, duration_s, total)
        if rest:
            lo = np.array([o.start for o in rest], np.uint64)
            covered |= {i for i in _region_at(after, lo) if i is not None}
    culprits += _shm(before, after, duration_s, total, covered, pid)
    for arena in _arenas(before, after, duration_s, total, covered, pid):
        # Arena heaps mapped before tracing and the ones traced since are one culprit: malloc's.
        traced = next((c for c in culprits if c.known is arena.known and c.klass is RegionClass.ANON), None)
        if traced is None:
            culprits.append(arena)
        else:
            culprits[culprits.index(traced)] = replace(
                traced,
                bytes=traced.bytes + arena.bytes,
                slope=traced.slope + arena.slope,
                share=traced.share + arena.share,
                evidence="traced mmap + arena shape",
                detail=f"{traced.mappings} arena heaps traced, {arena.detail}",
            )
    # Heap and GPU growth that no traced brk/mmap explains still has a name.
    for klass, label, evidence in (
        (RegionClass.HEAP, "[heap] (malloc main arena)", "heap"),
        (RegionClass.GPU, "GPU driver mappings", "gpu mappings"),
    ):
        rest = by_class[klass] - sum(c.bytes for c in culprits if c.klass is klass)
        if rest > 0:
            culprits.append(_by_class(klass, rest, duration_s, total, pid, label, evidence))
    culprits = [c for c in culprits if c.share >= min_share and c.slope >= min_slope]
    culprits.sort(key=lambda c: -c.bytes)
    return Attribution(total, by_class, duration_s, culprits)
