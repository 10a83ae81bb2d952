"""bench/correlate: the correlator at scale: 1M traced events into the ledger, then attribution of
the growth between two snapshots of 50k regions. Goal: under 5 s here. Prints time and peak memory.

Peer, measured in the same run on the same data: the interval join done the obvious way with
pandas (IntervalIndex overlap per outstanding mapping), which is what the correlator's
binary-search join (proc.growth.held_between) replaces.

    python bench/correlate.py [--events 1000000] [--regions 50000]
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leakhunt.analysis.correlate import correlate  # noqa: E402
from leakhunt.proc.growth import held_between  # noqa: E402
from leakhunt.proc.smaps import parse_smaps  # noqa: E402
from leakhunt.trace.events import (  # noqa: E402
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    EventKind,
    Frame,
    MmapEvent,
    Outstanding,  # noqa: E402
)
from leakhunt.trace.ledger import Ledger  # noqa: E402

PAGE = 4096
BASE = 0x7F0000000000
CALLERS = [
    Frame(0x7F1000001000 + i * 0x100, f"/usr/lib/libbench{i % 7}.so", f"func_{i}", 0x20) for i in range(40)
]


def make_events(n: int, rng: np.random.Generator) -> tuple[list[MmapEvent], int]:
    """n events from 40 call sites: site 0 never unmaps (the leak), the others unmap what they
    mapped soon after (a balanced churn whose outstanding set stays small)."""
    events, live, slot = [], [], 0
    ts = 1_000.0
    while len(events) < n:
        ts += 1e-5
        if live and rng.random() < 0.5:
            addr, length = live.pop()
            events.append(MmapEvent(ts, 1, 1, EventKind.MUNMAP, addr, length))
            continue
        site = int(rng.integers(0, len(CALLERS)))
        length = PAGE * int(rng.integers(1, 4))
        addr = BASE + slot * 4 * PAGE
        slot += 1
        events.append(
            MmapEvent(
                ts,
                1,
                1,
                EventKind.MMAP,
                0,
                length,
                3,
                MAP_PRIVATE | MAP_ANONYMOUS,
                -1,
                addr,
                caller=CALLERS[site],
            )
        )
        if site != 0:
            live.append((addr, length))
    return events, slot


def smaps_text(starts: np.ndarray, sizes: np.ndarray, rss: np.ndarray) -> bytes:
    lines = []
    for s, z, r in zip(starts.tolist(), sizes.tolist(), rss.tolist()):
        lines.append(
            f"{s:x}-{s + z:x} rw-p 00000000 00:00 0 \nSize: {z // 1024} kB\nRss: {r // 1024} kB\n"
            f"Pss: {r // 1024} kB\nAnonymous: {r // 1024} kB\n"
        )
    return "".join(lines).encode()


def pandas_join(snapshot, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    import pandas as pd

    index = pd.IntervalIndex.from_arrays(
        snapshot.start.astype(np.int64), snapshot.end.astype(np.int64), closed="left"
    )
    rss = snapshot.rss.astype(np.float64)
    size = (snapshot.end - snapshot.start).astype(np.float64)
    out = np.zeros(len(lo))
    for k, (a, b) in enumerate(zip(lo.tolist(), hi.tolist())):
        hit = index.overlaps(pd.Interval(a, b, closed="left"))
        for i in np.flatnonzero(hit):
            overlap = min(b, int(snapshot.end[i])) - max(a, int(snapshot.start[i]))
            out[k] += rss[i] * overlap / size[i]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--regions", type=int, default=50_000)
    ap.add_argument(
        "--peer-sample", type=int, default=2000, help="outstanding mappings the pandas peer joins"
    )
    args = ap.parse_args()
    rng = np.random.default_rng(7)
    events, slots = make_events(args.events, rng)

    def feed() -> Ledger:
        ledger = Ledger(max_ranges=2_000_000)
        for chunk in range(0, len(events), 10_000):  # as a backend's polls deliver them
            ledger.update(events[chunk : chunk + 10_000])
        return ledger

    t0 = time.perf_counter()
    ledger = feed()
    t_ledger = time.perf_counter() - t0
    tracemalloc.start()  # memory is measured in a second pass: tracing allocations slows Python down
    feed()
    _, peak_ledger = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    outstanding = [
        Outstanding(o.pid, o.start, o.end - o.start, ledger.site_info.get(o.site, (None, None))[0])
        for o in ledger.outstanding()
    ]

    # Two snapshots of `regions` anonymous regions over the same address span; the later one holds
    # the outstanding mappings' pages resident.
    span = slots * 4 * PAGE
    starts = BASE + np.arange(args.regions, dtype=np.int64) * (span // args.regions // PAGE) * PAGE
    sizes = np.full(args.regions, (span // args.regions // PAGE) * PAGE, np.int64)
    before = parse_smaps(smaps_text(starts, sizes, np.zeros(args.regions, np.int64)))
    lo = np.array([o.start for o in outstanding], np.uint64)
    hi = lo + np.array([o.length for o in outstanding], np.uint64)
    idx = np.searchsorted(starts, lo.astype(np.int64), side="right") - 1
    rss = np.bincount(idx, weights=(hi - lo).astype(np.float64), minlength=args.regions)
    after = parse_smaps(smaps_text(starts, sizes, np.minimum(rss.astype(np.int64) // PAGE * PAGE, sizes)))

    t1 = time.perf_counter()
    attribution = correlate(before, after, outstanding, duration_s=60.0)
    t_correlate = time.perf_counter() - t1
    tracemalloc.start()
    correlate(before, after, outstanding, duration_s=60.0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    n = min(args.peer_sample, len(outstanding))
    t2 = time.perf_counter()
    ours = held_between(after, lo[:n], hi[:n])
    t_ours_join = time.perf_counter() - t2
    t3 = time.perf_counter()
    theirs = pandas_join(after, lo[:n], hi[:n])
    t_peer_join = time.perf_counter() - t3
    assert np.allclose(ours, theirs, rtol=1e-6, atol=PAGE), "the two joins disagree"

    top = attribution.culprits[0] if attribution.culprits else None
    print(
        f"events            {len(events):>10,}   ledger: {t_ledger:6.2f} s ({len(events) / t_ledger:,.0f} events/s)"
    )
    print(f"outstanding       {len(outstanding):>10,}   regions per snapshot: {args.regions:,}")
    print(
        f"correlate         {t_correlate:>10.2f} s   top culprit: {top.title if top else None} "
        f"({attribution.explained_fraction:.0%} explained)"
    )
    print(
        f"total             {t_ledger + t_correlate:>10.2f} s   (goal < 5 s)   peak Python memory: "
        f"ledger {peak_ledger / 2**20:.0f} MiB, correlate {peak / 2**20:.0f} MiB"
    )
    print(
        f"join of {n:,} mappings: binary search {t_ours_join * 1000:.1f} ms, pandas IntervalIndex "
        f"{t_peer_join * 1000:.0f} ms: ratio pandas/leakhunt = {t_peer_join / max(t_ours_join, 1e-9):,.0f}x"
    )
    print("goal met" if t_ledger + t_correlate < 5 else "goal NOT met")


if __name__ == "__main__":
    main()
