"""The ledger's C core against its Python reference: any sequence of mmap-family calls, kernel
mappings and their removal, applied to both, leaves the same ranges, the same per-site sums and
the same count of unmatched unmaps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leakhunt.trace import ledger as L
from leakhunt.trace.events import MAP_FIXED, MREMAP_DONTUNMAP

pytestmark = pytest.mark.skipif(L._ledger is None, reason="the C core was not built (no compiler)")

P = 4096
SITES = 4
BASE = 0x7F00_0000_0000

# A call over a small address space (64 pages), so that calls overlap often.
call = st.tuples(
    st.sampled_from(
        [L.KIND_MMAP, L.KIND_MUNMAP, L.KIND_MREMAP, L.KIND_BRK, L.KIND_SHMAT, L.KIND_SHMDT, L.KIND_KADD]
    ),
    st.integers(1, 2),  # pid
    st.integers(0, 63),  # page
    st.integers(1, 16),  # pages
    st.integers(1, 16),  # new pages / segment pages
    st.sampled_from([0, MAP_FIXED, MREMAP_DONTUNMAP]),
    st.integers(0, 63),  # result page
    st.booleans(),  # failed
    st.integers(-1, SITES - 1),
)


def columns(calls: list) -> list[np.ndarray]:
    rows = np.zeros(len(calls), L.CALLS)
    for i, (kind, pid, page, n, m, flags, result, failed, _) in enumerate(calls):
        ret = -12 if failed else BASE + result * P
        rows[i] = (i * 1000, pid, kind, BASE + page * P, n * P - 1, m * P, flags, ret, 0, 0, 0)
    sites = np.array([c[-1] for c in calls], np.int32)
    return [
        np.ascontiguousarray(rows[f]) for f in ("ts", "pid", "kind", "addr", "length", "arg", "flags", "ret")
    ] + [sites]


def run(core, calls, removals, drop_at):
    sums = [np.zeros(SITES, np.int64) for _ in range(3)]
    core.set_brk(1, BASE + 32 * P)
    half = len(calls) // 2
    unmatched = core.apply(*(c[:half] for c in columns(calls)), *sums, MAP_FIXED, MREMAP_DONTUNMAP)
    for pid, page, n, ts in removals:
        core.remove(pid, BASE + page * P, BASE + (page + n) * P, ts * 1000)
    if drop_at is not None:
        core.drop(2, drop_at * 1000, sums[2])
    cols = columns(calls)
    unmatched += core.apply(*(c[half:] for c in cols), *sums, MAP_FIXED, MREMAP_DONTUNMAP)
    ranges = np.sort(np.frombuffer(core.export(), L._EXPORT), order=["pid", "lo"])
    at = core.at(1, BASE + 10 * P)
    return ranges.tolist(), [s.tolist() for s in sums], unmatched, len(core), at


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    st.lists(call, max_size=60),
    st.lists(
        st.tuples(st.integers(1, 2), st.integers(0, 63), st.integers(1, 16), st.integers(0, 30)), max_size=5
    ),
    st.one_of(st.none(), st.integers(0, 60)),
)
def test_the_c_core_does_what_the_python_reference_does(calls, removals, drop_at):
    assert run(L._ledger.Ranges(), calls, removals, drop_at) == run(L._PyRanges(), calls, removals, drop_at)


def test_max_ranges_is_counted_not_exceeded():
    for core in (L._ledger.Ranges(3), L._PyRanges(3)):
        calls = [(L.KIND_MMAP, 1, 0, 1, 1, 0, 10 * i, False, 0) for i in range(5)]
        core.apply(
            *columns(calls), *[np.zeros(SITES, np.int64) for _ in range(3)], MAP_FIXED, MREMAP_DONTUNMAP
        )
        assert (len(core), core.dropped) == (3, 2)


def test_a_million_ranges_in_many_blocks_stay_sorted_and_whole():
    """Blocks split and empty as ranges come and go; the ranges stay sorted, none lost."""
    core = L._ledger.Ranges()
    n = 200_000
    rows = np.zeros(n, L.CALLS)
    rng = np.random.default_rng(7)
    rows["ts"] = np.arange(n)
    rows["pid"] = 1
    rows["kind"] = L.KIND_MMAP
    rows["length"] = P
    rows["ret"] = BASE + rng.permutation(n) * 2 * P  # mapped in random order, a page apart
    sums = [np.zeros(1, np.int64) for _ in range(3)]
    cols = [
        np.ascontiguousarray(rows[f]) for f in ("ts", "pid", "kind", "addr", "length", "arg", "flags", "ret")
    ]
    core.apply(*cols, np.zeros(n, np.int32), *sums, MAP_FIXED, MREMAP_DONTUNMAP)
    ranges = np.frombuffer(core.export(), L._EXPORT)
    assert len(ranges) == len(core) == n
    assert np.all(np.diff(ranges["lo"].astype(np.int64)) == 2 * P)
    # One unmap over every other page of the lower half: half of those ranges go.
    unmap = np.zeros(1, L.CALLS)
    unmap[0] = (n, 1, L.KIND_MUNMAP, BASE, n * P, 0, 0, 0, 0, 0, 0)
    cols = [
        np.ascontiguousarray(unmap[f]) for f in ("ts", "pid", "kind", "addr", "length", "arg", "flags", "ret")
    ]
    core.apply(*cols, np.zeros(1, np.int32), *sums, MAP_FIXED, MREMAP_DONTUNMAP)
    assert len(core) == n // 2
    assert sums[2][0] == (n // 2) * P
