"""The ledger of outstanding mappings: what the target mapped and has not unmapped, by address
range, and who asked for it.

Two inputs. Events a backend streams (MmapEvent) are applied here with full range semantics:
partial unmaps, mremap moves and growth, MAP_FIXED replacement, brk, shmat/shmdt. A BPF backend
also keeps a ledger in the kernel for the common case (a plain mmap and, maybe, its exact munmap:
never sent to user space, which is what keeps overhead low); its KernelState is merged in here.
Streamed events that cut into a kernel-held mapping are remembered as dead sub-ranges of that
mapping (an overlay), since user space cannot edit the kernel's map safely.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

from leakhunt.trace.events import (
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MREMAP_DONTUNMAP,
    EventKind,
    Frame,
    MmapEvent,
    Stack,
)

PAGE = 4096

#: Who made a mapping: (pid, syscall ip, return address into the caller, path), where path is
#: the BCC probe's hash of the frames past the caller (0 where a backend has none), so that two
#: paths through one caller are two sites. Resolved to a library, symbol and stack by the
#: backend; kept raw here so the ledger never does I/O.
SiteKey = tuple[int, int, int, int]


def page_round(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


class KernelMapping(NamedTuple):
    """One mapping the kernel side holds: mapped and not (exactly) unmapped yet."""

    pid: int
    start: int
    length: int
    ip: int
    ra: int
    ts: int  # monotonic ns of the mmap: with pid, the mapping's identity
    flags: int = 0
    fd: int = -1
    path: int = 0

    @property
    def site(self) -> SiteKey:
        return (self.pid, self.ip, self.ra, self.path)


@dataclass(frozen=True)
class SiteCounts:
    count: int = 0
    mapped: int = 0
    unmapped: int = 0


class Lifecycle(NamedTuple):
    """A traced process that exec'd or exited (its address space is gone), or was forked."""

    kind: str  # fork | exec | exit
    pid: int
    ts: int  # wall-clock ns
    child: int = 0


@dataclass(frozen=True)
class KernelState:
    """A snapshot of the kernel-side ledger, taken after every event a poll returned."""

    taken_ns: int
    mappings: tuple[KernelMapping, ...] = ()
    sites: dict[SiteKey, SiteCounts] = field(default_factory=dict)  # kernel-handled calls only
    syscalls: dict[str, int] = field(default_factory=dict)  # every traced call, by kind
    callers: dict[SiteKey, tuple[Frame, Stack]] = field(default_factory=dict)  # who each site is
    lifecycle: tuple[Lifecycle, ...] = ()  # exec/exit of traced processes since the last state


class Outstanding(NamedTuple):
    pid: int
    start: int
    end: int
    site: SiteKey
    ts: int
    held_by: str  # "kernel" or "user"


@dataclass
class _Stats:
    count: int = 0
    mapped: int = 0
    unmapped: int = 0


class _Ranges:
    """Non-overlapping ranges of one process, sorted by start."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.items: dict[int, tuple[int, SiteKey, int]] = {}  # start -> (end, site, ts)

    def __len__(self) -> int:
        return len(self.starts)

    def add(self, start: int, end: int, site: SiteKey, ts: int) -> None:
        bisect.insort(self.starts, start)
        self.items[start] = (end, site, ts)

    def cut(self, lo: int, hi: int) -> list[tuple[SiteKey, int, int]]:
        """Remove [lo, hi) from every range; returns (site, bytes removed, ts) per range touched."""
        i = bisect.bisect_right(self.starts, lo) - 1
        if i < 0 or self.items[self.starts[i]][0] <= lo:
            i += 1
        touched, keep = [], []
        while i < len(self.starts) and self.starts[i] < hi:
            s = self.starts.pop(i)
            e, site, ts = self.items.pop(s)
            touched.append((site, min(e, hi) - max(s, lo), ts))
            if s < lo:
                keep.append((s, lo, site, ts))
            if e > hi:
                keep.append((hi, e, site, ts))
        for s, e, site, ts in keep:
            self.add(s, e, site, ts)
        return touched

    def at(self, address: int) -> tuple[int, int, SiteKey, int] | None:
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0:
            s = self.starts[i]
            e, site, ts = self.items[s]
            if address < e:
                return s, e, site, ts
        return None


class Ledger:
    """Outstanding mappings of a traced process tree, and per-site counts of what was mapped."""

    def __init__(self, max_ranges: int = 1_000_000) -> None:
        self.max_ranges = max_ranges
        self._user: dict[int, _Ranges] = defaultdict(_Ranges)
        self._user_count = 0
        self._stats: dict[SiteKey, _Stats] = defaultdict(_Stats)
        self._kernel: KernelState = KernelState(0)
        self._kernel_by_pid: dict[int, list[KernelMapping]] = {}
        self._dead: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (pid, ts) -> dead offsets
        self._epoch: dict[int, int] = {}  # pid -> ns of its exec/exit: older kernel entries are void
        self._brk: dict[int, int] = {}
        self.site_info: dict[SiteKey, tuple[Frame | None, Stack | None]] = {}  # who each site is
        self.dropped = 0  # mappings not kept because max_ranges was reached
        self.unmatched_unmaps = 0  # unmaps of memory we never saw mapped (mapped before the trace)

    # -- inputs --------------------------------------------------------------------------------

    def update(self, events: list[MmapEvent], state: KernelState | None = None) -> None:
        """Apply one poll's worth: the kernel state first (it is newer than every event), then
        the events in time order."""
        timeline: list[tuple[int, object]] = [(_ns(ev.ts), ev) for ev in events]
        if state is not None:
            self._sync(state)
            timeline += [(lc.ts, lc) for lc in state.lifecycle if lc.kind in ("exec", "exit")]
        for _, item in sorted(timeline, key=lambda x: x[0]):
            if isinstance(item, Lifecycle):
                self.process_gone(item.pid, item.ts)
            else:
                self.apply(item)

    def set_brk(self, pid: int, current: int) -> None:
        """The program break when tracing began (the end of [heap]); growth is counted from it."""
        self._brk.setdefault(pid, current)

    def process_gone(self, pid: int, ts_ns: int) -> None:
        """The process exited or exec'd: its address space, and everything in it, is gone."""
        for start in list(self._user[pid].starts):
            end, site, _ = self._user[pid].items[start]
            self._stats[site].unmapped += end - start
        self._user_count -= len(self._user.pop(pid, _Ranges()))
        for m in self._kernel_by_pid.get(pid, ()):
            if m.ts < ts_ns:
                self._stats[m.site].unmapped += self._live_bytes(m)
        self._epoch[pid] = ts_ns
        self._brk.pop(pid, None)
        self._kernel_by_pid[pid] = [m for m in self._kernel_by_pid.get(pid, ()) if m.ts >= ts_ns]

    def apply(self, ev: MmapEvent) -> None:
        if ev.failed:
            return
        ts = _ns(ev.ts)
        site = site_of(ev)
        if site not in self.site_info and (ev.caller is not None or ev.stack is not None):
            self.site_info[site] = (ev.caller, ev.stack)
        kind = ev.kind
        if kind is EventKind.MMAP:
            length = page_round(ev.length)
            if ev.flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
                self._cut(ev.pid, ev.ret, ev.ret + length, ts)  # MAP_FIXED replaces what was there
            self._map(ev.pid, ev.ret, ev.ret + length, site, ts)
        elif kind is EventKind.MUNMAP:
            if not self._cut(ev.pid, ev.addr, ev.addr + page_round(ev.length), ts):
                self.unmatched_unmaps += 1
        elif kind is EventKind.MREMAP:
            old_lo, old_hi = ev.addr, ev.addr + page_round(ev.length)
            owner = self._owner(ev.pid, old_lo, old_hi, ts) or site
            if not ev.flags & MREMAP_DONTUNMAP:
                self._cut(ev.pid, old_lo, old_hi, ts, count=False)
            new_len = page_round(ev.new_length)
            old_len = old_hi - old_lo
            # The moved pages stay the owner's; growth is counted as mapped by the owner too.
            self._add_range(ev.pid, ev.ret, ev.ret + new_len, owner, ts)
            st = self._stats[owner]
            if new_len > old_len:
                st.mapped += new_len - old_len
            elif new_len < old_len:
                st.unmapped += old_len - new_len
        elif kind is EventKind.BRK:
            cur = self._brk.get(ev.pid)
            new = ev.ret
            if cur is not None and new > cur:
                self._map(ev.pid, cur, new, site, ts)
            elif cur is not None and new < cur:
                self._cut(ev.pid, new, cur, ts)
            self._brk[ev.pid] = new
        elif kind is EventKind.SHMAT:
            if ev.length:
                self._map(ev.pid, ev.ret, ev.ret + page_round(ev.length), site, ts)
        elif kind is EventKind.SHMDT:
            hit = self._user[ev.pid].at(ev.addr)
            if hit is not None:
                self._cut(ev.pid, hit[0], hit[1], ts)

    # -- outputs -------------------------------------------------------------------------------

    def site_totals(self) -> dict[SiteKey, tuple[int, int, int, int, int]]:
        """site -> (outstanding bytes, outstanding mappings, count, mapped, unmapped)."""
        out: dict[SiteKey, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
        for o in self.outstanding():
            t = out[o.site]
            t[0] += o.end - o.start
            t[1] += 1
        for site, c in self._kernel.sites.items():
            t = out[site]
            t[2] += c.count
            t[3] += c.mapped
            t[4] += c.unmapped
        for site, s in self._stats.items():
            t = out[site]
            t[2] += s.count
            t[3] += s.mapped
            t[4] += s.unmapped
        return {k: tuple(v) for k, v in out.items()}

    def outstanding(self) -> list[Outstanding]:
        """Every outstanding range; a kernel mapping cut by streamed unmaps gives its live pieces."""
        out = []
        for pid, ranges in self._user.items():
            for s in ranges.starts:
                e, site, ts = ranges.items[s]
                out.append(Outstanding(pid, s, e, site, ts, "user"))
        for pid, maps in self._kernel_by_pid.items():
            for m in maps:
                site = m.site
                for lo, hi in _live_pieces(m.length, self._dead.get((m.pid, m.ts), ())):
                    out.append(Outstanding(pid, m.start + lo, m.start + hi, site, m.ts, "kernel"))
        return out

    @property
    def outstanding_bytes(self) -> int:
        return sum(o.end - o.start for o in self.outstanding())

    @property
    def kernel_syscalls(self) -> dict[str, int]:
        return dict(self._kernel.syscalls)

    # -- internals -----------------------------------------------------------------------------

    def _sync(self, state: KernelState) -> None:
        self._kernel = state
        self.site_info.update(state.callers)
        by_pid: dict[int, list[KernelMapping]] = defaultdict(list)
        for m in state.mappings:
            if m.ts >= self._epoch.get(m.pid, 0):
                by_pid[m.pid].append(m)
        for maps in by_pid.values():
            maps.sort(key=lambda m: m.start)
        self._kernel_by_pid = dict(by_pid)
        live = {(m.pid, m.ts) for m in state.mappings}
        self._dead = {k: v for k, v in self._dead.items() if k in live}

    def _map(self, pid: int, start: int, end: int, site: SiteKey, ts: int) -> None:
        st = self._stats[site]
        st.count += 1
        st.mapped += end - start
        self._add_range(pid, start, end, site, ts)

    def _add_range(self, pid: int, start: int, end: int, site: SiteKey, ts: int) -> None:
        if end <= start:
            return
        if self._user_count >= self.max_ranges:
            self.dropped += 1
            return
        # A new mapping never overlaps a live one: whatever we still hold there is stale.
        ranges = self._user[pid]
        before_n = len(ranges)
        ranges.cut(start, end)
        ranges.add(start, end, site, ts)
        self._user_count += len(ranges) - before_n

    def _cut(self, pid: int, lo: int, hi: int, ts: int, count: bool = True) -> bool:
        """Unmap [lo, hi) in pid: trim user-held ranges and overlay kernel-held ones made before
        ``ts``. Returns whether anything was there."""
        ranges = self._user[pid]
        before_n = len(ranges)
        touched = ranges.cut(lo, hi)
        self._user_count += len(ranges) - before_n
        found = bool(touched)
        for site, n, _ in touched:
            if count:
                self._stats[site].unmapped += n
        for m in self._kernel_overlapping(pid, lo, hi, ts):
            dead = self._dead.setdefault((m.pid, m.ts), [])
            a, b = max(lo, m.start) - m.start, min(hi, m.start + m.length) - m.start
            before = self._live_bytes(m)
            dead.append((a, b))
            dead[:] = _merge(dead)
            if count:
                self._stats[m.site].unmapped += before - self._live_bytes(m)
            found = True
        return found

    def _kernel_overlapping(self, pid: int, lo: int, hi: int, ts: int) -> list[KernelMapping]:
        return [
            m
            for m in self._kernel_by_pid.get(pid, ())
            if m.start < hi and m.start + m.length > lo and m.ts < ts
        ]

    def _owner(self, pid: int, lo: int, hi: int, ts: int) -> SiteKey | None:
        hit = self._user[pid].at(lo)
        if hit is not None:
            return hit[2]
        for m in self._kernel_overlapping(pid, lo, hi, ts):
            return m.site
        return None

    def _live_bytes(self, m: KernelMapping) -> int:
        return sum(hi - lo for lo, hi in _live_pieces(m.length, self._dead.get((m.pid, m.ts), ())))


def site_of(ev: MmapEvent) -> SiteKey:
    """The raw site of a streamed event: backends put the syscall ip in the first frame of its
    stack, the return address in its caller, and the kernel's path hash in ``path``."""
    ra = ev.caller.address if ev.caller is not None else 0
    if ev.stack is not None and ev.stack.frames:
        return (ev.pid, ev.stack.frames[0].address, ra, ev.path)
    return (ev.pid, 0, ra, ev.path)


def _ns(ts: float) -> int:
    return int(round(ts * 1e9))


def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _live_pieces(length: int, dead) -> list[tuple[int, int]]:
    pieces, pos = [], 0
    for lo, hi in dead:
        if lo > pos:
            pieces.append((pos, min(lo, length)))
        pos = max(pos, hi)
    if pos < length:
        pieces.append((pos, length))
    return [(a, b) for a, b in pieces if b > a]
