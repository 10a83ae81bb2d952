"""The ledger's range semantics, on events as backends deliver them, and the kernel-held part."""

from __future__ import annotations

from leakhunt.trace.callers import by_caller
from leakhunt.trace.events import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MREMAP_DONTUNMAP,
    MREMAP_MAYMOVE,
    EventKind,
    Frame,
    MmapEvent,
    Stack,
)
from leakhunt.trace.ledger import KernelMapping, KernelState, Ledger, Lifecycle, SiteCounts

P = 4096
PID = 100
WRAPPER_IP = 0x7F00_0000_1019
A = 0x7F10_0000_0000
B = 0x7F20_0000_0000


def caller(name: str, lib: str = "/usr/lib/libfoo.so") -> Frame:
    return Frame(0x5000 + sum(map(ord, name)), lib, name, 0x10)


def ev(kind: EventKind, t: float, who: str = "alloc", pid: int = PID, **kw) -> MmapEvent:
    c = caller(who)
    return MmapEvent(
        ts=t,
        pid=pid,
        tid=pid,
        kind=kind,
        caller=c,
        stack=Stack((Frame(WRAPPER_IP, "/lib/libc.so.6", "syscall", 0x19), c), True, "test"),
        **kw,
    )


def mmap(
    t: float, addr: int, length: int, who: str = "alloc", flags: int = MAP_PRIVATE | MAP_ANONYMOUS, **kw
):
    return ev(
        EventKind.MMAP,
        t,
        who,
        addr=addr if flags & MAP_FIXED else 0,
        length=length,
        flags=flags,
        ret=addr,
        **kw,
    )


def munmap(t: float, addr: int, length: int, **kw):
    return ev(EventKind.MUNMAP, t, "free", addr=addr, length=length, ret=0, **kw)


def held(ledger: Ledger) -> dict[str, int]:
    return {c.symbol: c.outstanding_bytes for c in by_caller(ledger) if c.outstanding_bytes}


def test_partial_unmaps_leave_the_pieces_in_place():
    ledger = Ledger()
    ledger.update([mmap(1, A, 8 * P), munmap(2, A + 2 * P, 2 * P), munmap(3, A, P), munmap(4, A + 7 * P, P)])
    assert held(ledger) == {"alloc": 4 * P}
    assert sorted((o.start, o.end) for o in ledger.outstanding()) == [
        (A + P, A + 2 * P),
        (A + 4 * P, A + 7 * P),
    ]
    totals = by_caller(ledger)[0]
    assert (totals.count, totals.mapped_bytes, totals.unmapped_bytes, totals.mappings) == (1, 8 * P, 4 * P, 2)


def test_lengths_round_up_to_pages_like_the_kernel():
    ledger = Ledger()
    ledger.update([mmap(1, A, 5000), munmap(2, A, 5000)])
    assert ledger.outstanding_bytes == 0


def test_events_apply_in_time_order_whatever_order_they_come_in():
    ledger = Ledger()
    ledger.update([munmap(2, A, 4 * P), mmap(1, A, 4 * P)])
    assert ledger.outstanding_bytes == 0


def test_mremap_moves_and_grows_and_the_owner_keeps_it():
    ledger = Ledger()
    grow = ev(
        EventKind.MREMAP, 2, "realloc", addr=A, length=4 * P, new_length=16 * P, flags=MREMAP_MAYMOVE, ret=B
    )
    ledger.update([mmap(1, A, 4 * P), grow])
    assert held(ledger) == {"alloc": 16 * P}
    assert [(o.start, o.end) for o in ledger.outstanding()] == [(B, B + 16 * P)]
    shrink = ev(EventKind.MREMAP, 3, "realloc", addr=B, length=16 * P, new_length=2 * P, ret=B)
    ledger.update([shrink])
    assert held(ledger) == {"alloc": 2 * P}


def test_mremap_dontunmap_keeps_the_old_range():
    ledger = Ledger()
    dup = ev(
        EventKind.MREMAP,
        2,
        "realloc",
        addr=A,
        length=4 * P,
        new_length=4 * P,
        flags=MREMAP_MAYMOVE | MREMAP_DONTUNMAP,
        ret=B,
    )
    ledger.update([mmap(1, A, 4 * P), dup])
    assert ledger.outstanding_bytes == 8 * P


def test_map_fixed_replaces_what_was_there():
    ledger = Ledger()
    reserve = mmap(1, A, 16 * P, "reserve")
    commit = mmap(2, A + 4 * P, 4 * P, "commit", flags=MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
    ledger.update([reserve, commit])
    assert held(ledger) == {"reserve": 12 * P, "commit": 4 * P}


def test_brk_growth_counts_from_the_break_at_the_start():
    ledger = Ledger()
    ledger.set_brk(PID, 0x1000_0000)
    ledger.update(
        [
            ev(EventKind.BRK, 1, "sbrk", addr=0x1010_0000, ret=0x1010_0000),
            ev(EventKind.BRK, 2, "sbrk", addr=0x1008_0000, ret=0x1008_0000),
        ]
    )
    assert held(ledger) == {"sbrk": 0x8_0000}


def test_shmat_then_shmdt():
    ledger = Ledger()
    ledger.update([ev(EventKind.SHMAT, 1, "attach", fd=7, length=16 * P, ret=A)])
    assert held(ledger) == {"attach": 16 * P}
    ledger.update([ev(EventKind.SHMDT, 2, "detach", addr=A)])
    assert ledger.outstanding_bytes == 0


def test_failed_calls_change_nothing():
    ledger = Ledger()
    ledger.update([MmapEvent(1, PID, PID, EventKind.MMAP, length=4 * P, ret=-12)])
    assert ledger.outstanding_bytes == 0


def kernel(mappings: list[KernelMapping], taken: float = 100.0, **kw) -> KernelState:
    return KernelState(int(taken * 1e9), tuple(mappings), **kw)


def km(start: int, length: int, t: float, ra: int = 0xAAA) -> KernelMapping:
    return KernelMapping(PID, start, length, WRAPPER_IP, ra, int(t * 1e9))


def test_kernel_held_mappings_count_with_their_caller():
    ledger = Ledger()
    state = kernel(
        [km(A, 8 * P, 1), km(B, P, 2)],
        sites={(PID, WRAPPER_IP, 0xAAA, 0): SiteCounts(3, 10 * P, P)},
        callers={(PID, WRAPPER_IP, 0xAAA, 0): (caller("pool_grow"), None)},
    )
    ledger.update([], state)
    (top,) = by_caller(ledger)
    assert (top.symbol, top.outstanding_bytes, top.count, top.mapped_bytes, top.unmapped_bytes) == (
        "pool_grow",
        9 * P,
        3,
        10 * P,
        P,
    )


def test_a_streamed_partial_unmap_cuts_into_a_kernel_held_mapping():
    ledger = Ledger()
    ledger.update([munmap(5, A + 2 * P, 2 * P)], kernel([km(A, 8 * P, 1)]))
    assert ledger.outstanding_bytes == 6 * P
    # The cut survives the next snapshot of the same kernel mapping...
    ledger.update([], kernel([km(A, 8 * P, 1)], taken=101))
    assert ledger.outstanding_bytes == 6 * P
    # ...and is forgotten once the kernel drops the mapping (its exact munmap, say).
    ledger.update([], kernel([], taken=102))
    assert ledger.outstanding_bytes == 0


def test_an_unmap_does_not_touch_a_kernel_mapping_made_after_it():
    ledger = Ledger()
    ledger.update([munmap(5, A, 8 * P)], kernel([km(A, 8 * P, 6)]))
    assert ledger.outstanding_bytes == 8 * P


def test_an_exec_or_exit_drops_the_address_space_but_not_later_mappings():
    ledger = Ledger()
    state = kernel([km(A, 8 * P, 1), km(B, P, 9)], lifecycle=(Lifecycle("exec", PID, int(5e9)),))
    ledger.update([mmap(2, 0x1000_0000, P), mmap(7, 0x2000_0000, 2 * P)], state)
    assert sorted(o.end - o.start for o in ledger.outstanding()) == [P, 2 * P]


def test_callers_group_sites_by_library_and_symbol():
    ledger = Ledger()
    ledger.update([mmap(1, A, 4 * P, pid=1), mmap(1, B, 2 * P, pid=2), mmap(2, 0x3000_0000, P, "other")])
    rows = by_caller(ledger)
    assert [(r.symbol, r.outstanding_bytes, r.mappings) for r in rows] == [
        ("alloc", 6 * P, 2),
        ("other", P, 1),
    ]
    assert rows[0].stack is not None and rows[0].stack.frames[1].symbol == "alloc"


def test_range_limit_is_counted_not_silent():
    ledger = Ledger(max_ranges=2)
    ledger.update([mmap(1, A, P), mmap(2, A + 10 * P, P), mmap(3, A + 20 * P, P)])
    assert ledger.dropped == 1 and ledger.outstanding_bytes == 2 * P
