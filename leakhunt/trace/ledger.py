"""The ledger of outstanding mappings: what the target mapped and has not unmapped, by address
range, and who asked for it.

Two inputs, merged into one set of ranges per process. Calls a backend streams are applied with
full range semantics: partial unmaps, mremap moves and growth, MAP_FIXED replacement, brk,
shmat/shmdt. A BPF backend also keeps a ledger in the kernel for the common case (a plain mmap
and, maybe, its exact munmap: never sent to user space, which is what keeps overhead low); each
KernelState it hands over adds the kernel's new mappings to the ranges as if mapped at their own
time, and takes away those the kernel dropped. So a streamed unmap that cuts a kernel-held
mapping cuts its range here, while the kernel's entry lives on untouched (user space cannot edit
the kernel's map safely); when the kernel drops the entry, its remains go too.

Calls arrive in batches, as numpy columns (CALLS), and are applied in one call to the C core
(``_ledger.c``); ``_PyRanges`` below does the same in Python: the fallback without a compiler and
the reference the C core is tested against. MmapEvent lists (the gdb backend, tests) are turned
into the same columns.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from leakhunt.trace.events import (
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MREMAP_DONTUNMAP,
    EventKind,
    Frame,
    MmapEvent,
    Stack,
)

try:
    from leakhunt.trace import _ledger
except ImportError:  # built without a compiler: the Python reference does the same, slower
    _ledger = None

PAGE = 4096

#: Who made a mapping: (pid, syscall ip, return address into the caller, path), where path is
#: the BCC probe's hash of the frames past the caller (0 where a backend has none), so that two
#: paths through one caller are two sites. Resolved to a library, symbol and stack by the
#: backend; kept raw here so the ledger never does I/O.
SiteKey = tuple[int, int, int, int]

# The calls the core applies (the C core's KIND_* numbering).
KIND_MMAP, KIND_MUNMAP, KIND_MREMAP, KIND_BRK, KIND_SHMAT, KIND_SHMDT, KIND_KADD = range(1, 8)
KINDS = {
    EventKind.MMAP: KIND_MMAP,
    EventKind.MUNMAP: KIND_MUNMAP,
    EventKind.MREMAP: KIND_MREMAP,
    EventKind.BRK: KIND_BRK,
    EventKind.SHMAT: KIND_SHMAT,
    EventKind.SHMDT: KIND_SHMDT,
}

#: A batch of calls: ts in wall-clock ns; addr, length and flags as the syscall took them; arg
#: the new length of an mremap or the size of a shmat's segment; ret what it returned; the site
#: (pid, ip, ra, path) of the call, which the ledger turns into a number of its own.
CALLS = np.dtype(
    [
        ("ts", "<i8"),
        ("pid", "<u4"),
        ("kind", "u1"),
        ("addr", "<u8"),
        ("length", "<u8"),
        ("arg", "<u8"),
        ("flags", "<u8"),
        ("ret", "<i8"),
        ("ip", "<u8"),
        ("ra", "<u8"),
        ("path", "<u8"),
    ]
)
_EXPORT = np.dtype(
    [("pid", "<u8"), ("lo", "<u8"), ("hi", "<u8"), ("ts", "<i8"), ("site", "<i4"), ("kernel", "<i4")]
)


def page_round(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


class KernelMapping(NamedTuple):
    """One mapping the kernel side holds: mapped and not (exactly) unmapped yet."""

    pid: int
    start: int
    length: int
    ip: int
    ra: int
    ts: int  # wall-clock ns of the mmap: with pid, the mapping's identity
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
    #: Every streamed call made before this has been handed over (None: every one, the last
    #: state). Kernel mappings made after it wait for the next state, so that a streamed unmap
    #: still on its way is applied before a newer mapping of the same pages.
    complete_ns: int | None = None


class HeldRange(NamedTuple):
    """A range the ledger holds: mapped and not unmapped, with its raw site."""

    pid: int
    start: int
    end: int
    site: SiteKey
    ts: int
    held_by: str  # "kernel" or "user"


class Ledger:
    """Outstanding mappings of a traced process tree, and per-site counts of what was mapped."""

    def __init__(self, max_ranges: int = 1_000_000) -> None:
        self.max_ranges = max_ranges
        self._ranges = _ledger.Ranges(max_ranges) if _ledger is not None else _PyRanges(max_ranges)
        self._ids: dict[SiteKey, int] = {}
        self._keys: list[SiteKey] = []
        # Per-site sums of what user space applied (the kernel's own are in its state).
        self._count = np.zeros(64, np.int64)
        self._mapped = np.zeros(64, np.int64)
        self._unmapped = np.zeros(64, np.int64)
        self._kernel: KernelState = KernelState(0)
        self._held: dict[tuple[int, int], KernelMapping] = {}  # (pid, ts) -> kernel mapping in ranges
        self._epoch: dict[int, int] = {}  # pid -> ns of its exec/exit: older kernel entries are void
        self.site_info: dict[SiteKey, tuple[Frame | None, Stack | None]] = {}  # who each site is
        self.unmatched_unmaps = 0  # unmaps of memory we never saw mapped (mapped before the trace)

    @property
    def dropped(self) -> int:
        """Mappings not kept because max_ranges was reached."""
        return self._ranges.dropped

    # -- inputs --------------------------------------------------------------------------------

    def update(self, events: list[MmapEvent] | np.ndarray, state: KernelState | None = None) -> None:
        """Apply one poll's worth: a batch of calls (CALLS columns) or MmapEvents, and the kernel
        state newer than all of them: its new mappings and the calls are applied in time order,
        with the exec and exit of traced processes."""
        calls = events if isinstance(events, np.ndarray) else self._columns(events)
        if state is not None:
            calls = np.concatenate([calls, self._sync(state)])
            gone = sorted((lc.ts, lc.pid) for lc in state.lifecycle if lc.kind in ("exec", "exit"))
        else:
            gone = []
        if len(calls) > 1:
            calls = calls[np.argsort(calls["ts"], kind="stable")]
        at = 0
        for ts, pid in gone:
            end = int(np.searchsorted(calls["ts"], ts, side="left"))
            self._apply(calls[at:end])
            self.process_gone(pid, ts)
            at = end
        self._apply(calls[at:])

    def set_brk(self, pid: int, current: int) -> None:
        """The program break when tracing began (the end of [heap]); growth is counted from it."""
        self._ranges.set_brk(pid, current)

    def process_gone(self, pid: int, ts_ns: int) -> None:
        """The process exited or exec'd: its address space, and everything in it, is gone."""
        self._ranges.drop(pid, ts_ns, self._unmapped)
        self._epoch[pid] = ts_ns
        for key in [k for k in self._held if k[0] == pid and k[1] < ts_ns]:
            del self._held[key]

    def site_id(self, key: SiteKey) -> int:
        sid = self._ids.get(key)
        if sid is None:
            sid = self._ids[key] = len(self._keys)
            self._keys.append(key)
            if sid >= len(self._count):
                grow = len(self._count)
                self._count, self._mapped, self._unmapped = (
                    np.concatenate([a, np.zeros(grow, np.int64)])
                    for a in (self._count, self._mapped, self._unmapped)
                )
        return sid

    # -- outputs -------------------------------------------------------------------------------

    def site_totals(self) -> dict[SiteKey, tuple[int, int, int, int, int]]:
        """site -> (outstanding bytes, outstanding mappings, count, mapped, unmapped)."""
        out: dict[SiteKey, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
        ranges = self._export()
        if len(ranges):
            sites = ranges["site"]
            held = np.bincount(sites, weights=(ranges["hi"] - ranges["lo"]).astype(np.float64))
            pieces = np.bincount(sites)
            for sid in np.flatnonzero(pieces):
                t = out[self._keys[sid]]
                t[0] += int(held[sid])
                t[1] += int(pieces[sid])
        for site, c in self._kernel.sites.items():
            t = out[site]
            t[2] += c.count
            t[3] += c.mapped
            t[4] += c.unmapped
        n = len(self._keys)
        for sid in np.flatnonzero(self._count[:n] | self._mapped[:n] | self._unmapped[:n]):
            t = out[self._keys[sid]]
            t[2] += int(self._count[sid])
            t[3] += int(self._mapped[sid])
            t[4] += int(self._unmapped[sid])
        return {k: tuple(v) for k, v in out.items()}

    def outstanding(self) -> list[HeldRange]:
        """Every outstanding range; a kernel mapping cut by streamed unmaps gives its live pieces."""
        keys = self._keys
        return [
            HeldRange(int(pid), int(lo), int(hi), keys[site], int(ts), "kernel" if kernel else "user")
            for pid, lo, hi, ts, site, kernel in self._export().tolist()
        ]

    @property
    def outstanding_bytes(self) -> int:
        ranges = self._export()
        return int((ranges["hi"] - ranges["lo"]).sum()) if len(ranges) else 0

    @property
    def kernel_syscalls(self) -> dict[str, int]:
        return dict(self._kernel.syscalls)

    # -- internals -----------------------------------------------------------------------------

    def _export(self) -> np.ndarray:
        return np.frombuffer(self._ranges.export(), _EXPORT)

    def _apply(self, calls: np.ndarray) -> None:
        if not len(calls):
            return
        sites = np.fromiter(
            (self.site_id(k) for k in zip(*(calls[f].tolist() for f in ("pid", "ip", "ra", "path")))),
            np.int32,
            len(calls),
        )
        cols = [
            np.ascontiguousarray(calls[f])
            for f in ("ts", "pid", "kind", "addr", "length", "arg", "flags", "ret")
        ]
        self.unmatched_unmaps += self._ranges.apply(
            *cols,
            sites,
            self._count,
            self._mapped,
            self._unmapped,
            MAP_FIXED | MAP_FIXED_NOREPLACE,
            MREMAP_DONTUNMAP,
        )

    def _sync(self, state: KernelState) -> np.ndarray:
        """Take in a kernel state: drop the ranges of mappings it no longer holds; return its
        new mappings, made before ``complete_ns``, as calls to apply at their own time."""
        self._kernel = state
        self.site_info.update(state.callers)
        current = {(m.pid, m.ts): m for m in state.mappings if m.ts >= self._epoch.get(m.pid, 0)}
        for key in [k for k in self._held if k not in current]:
            m = self._held.pop(key)
            self._ranges.remove(m.pid, m.start, m.start + m.length, m.ts)
        complete = state.complete_ns if state.complete_ns is not None else state.taken_ns
        new = [m for key, m in current.items() if key not in self._held and m.ts < complete]
        adds = np.zeros(len(new), CALLS)
        if new:
            for m in new:
                self._held[(m.pid, m.ts)] = m
            adds["ts"] = [m.ts for m in new]
            adds["pid"] = [m.pid for m in new]
            adds["kind"] = KIND_KADD
            adds["addr"] = [m.start for m in new]
            adds["length"] = [m.length for m in new]
            adds["ip"] = [m.ip for m in new]
            adds["ra"] = [m.ra for m in new]
            adds["path"] = [m.path for m in new]
        return adds

    def _columns(self, events: list[MmapEvent]) -> np.ndarray:
        """MmapEvents as CALLS columns (memfd_create has nothing to apply)."""
        rows = [ev for ev in events if ev.kind in KINDS]
        calls = np.zeros(len(rows), CALLS)
        for i, ev in enumerate(rows):
            site = site_of(ev)
            if site not in self.site_info and (ev.caller is not None or ev.stack is not None):
                self.site_info[site] = (ev.caller, ev.stack)
            arg = ev.new_length if ev.kind is EventKind.MREMAP else ev.length
            calls[i] = (
                _ns(ev.ts),
                ev.pid,
                KINDS[ev.kind],
                ev.addr,
                ev.length,
                arg,
                ev.flags,
                ev.ret,
                *site[1:],
            )
        return calls


def site_of(ev: MmapEvent) -> SiteKey:
    """The raw site of a streamed event: backends put the syscall ip in the first frame of its
    stack, the return address in its caller, and the kernel's path hash in ``path``."""
    ra = ev.caller.address if ev.caller is not None else 0
    if ev.stack is not None and ev.stack.frames:
        return (ev.pid, ev.stack.frames[0].address, ra, ev.path)
    return (ev.pid, 0, ra, ev.path)


def _ns(ts: float) -> int:
    return int(round(ts * 1e9))


class _Proc:
    """One process's ranges in the Python reference: sorted starts, start -> (end, site, ts, kernel)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.items: dict[int, tuple[int, int, int, int]] = {}
        self.brk: int | None = None

    def take(self, lo: int, hi: int) -> list[tuple[int, int, int, int, int]]:
        i = bisect.bisect_right(self.starts, lo) - 1
        if i < 0 or self.items[self.starts[i]][0] <= lo:
            i += 1
        out = []
        while i < len(self.starts) and self.starts[i] < hi:
            s = self.starts.pop(i)
            out.append((s, *self.items.pop(s)))
        return out

    def find(self, address: int) -> tuple[int, int, int, int, int] | None:
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0:
            s = self.starts[i]
            if address < self.items[s][0]:
                return (s, *self.items[s])
        return None


class _PyRanges:
    """The ledger's core in Python, with the C core's interface and semantics (see _ledger.c)."""

    def __init__(self, max_ranges: int = 1_000_000) -> None:
        self.max_ranges = max_ranges
        self.dropped = 0
        self._procs: dict[int, _Proc] = defaultdict(_Proc)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _insert(self, p: _Proc, lo: int, hi: int, ts: int, site: int, kernel: int) -> None:
        if hi <= lo:
            return
        if self._n >= self.max_ranges:
            self.dropped += 1
            return
        bisect.insort(p.starts, lo)
        p.items[lo] = (hi, ts, site, kernel)
        self._n += 1

    def _take(self, p: _Proc, lo: int, hi: int) -> list:
        out = p.take(lo, hi)
        self._n -= len(out)
        return out

    def _cut(self, p: _Proc, lo: int, hi: int, ts: int, unmapped, count: bool) -> bool:
        found = False
        for s, e, t, site, kernel in self._take(p, lo, hi):
            if t > ts:
                self._insert(p, s, e, t, site, kernel)
                continue
            found = True
            if count and site >= 0:
                unmapped[site] += min(e, hi) - max(s, lo)
            self._insert(p, s, lo, t, site, kernel)
            self._insert(p, hi, e, t, site, kernel)
        return found

    def _add(self, p: _Proc, lo: int, hi: int, ts: int, site: int, kernel: int) -> None:
        for s, e, t, st, k in self._take(p, lo, hi):
            self._insert(p, s, lo, t, st, k)
            self._insert(p, hi, e, t, st, k)
        self._insert(p, lo, hi, ts, site, kernel)

    def apply(
        self, ts, pid, kind, addr, length, arg, flags, ret, site, count, mapped, unmapped, fixed, dontunmap
    ):
        unmatched = 0
        rows = zip(*(c.tolist() for c in (ts, pid, kind, addr, length, arg, flags, ret, site)))
        for t, pid_, k, a, n, x, f, r, s in rows:
            if -4096 < r < 0:
                continue
            p = self._procs[pid_]
            if k == KIND_MMAP:
                lo, hi = r, r + page_round(n)
                if f & fixed:
                    self._cut(p, lo, hi, t, unmapped, True)
                if s >= 0:
                    count[s] += 1
                    mapped[s] += hi - lo
                self._add(p, lo, hi, t, s, 0)
            elif k == KIND_KADD:
                self._add(p, a, a + n, t, s, 1)
            elif k == KIND_MUNMAP:
                if not self._cut(p, a, a + page_round(n), t, unmapped, True):
                    unmatched += 1
            elif k == KIND_MREMAP:
                olo, ohi, nlen = a, a + page_round(n), page_round(x)
                owner = p.find(olo)
                os_ = owner[3] if owner is not None and owner[2] <= t else s
                if not f & dontunmap:
                    self._cut(p, olo, ohi, t, unmapped, False)
                self._add(p, r, r + nlen, t, os_, 0)
                if os_ >= 0 and nlen > ohi - olo:
                    mapped[os_] += nlen - (ohi - olo)
                elif os_ >= 0 and nlen < ohi - olo:
                    unmapped[os_] += (ohi - olo) - nlen
            elif k == KIND_BRK:
                if p.brk is not None and r > p.brk:
                    if s >= 0:
                        count[s] += 1
                        mapped[s] += r - p.brk
                    self._add(p, p.brk, r, t, s, 0)
                elif p.brk is not None and r < p.brk:
                    self._cut(p, r, p.brk, t, unmapped, True)
                p.brk = r
            elif k == KIND_SHMAT:
                if x:
                    lo, hi = r, r + page_round(x)
                    if s >= 0:
                        count[s] += 1
                        mapped[s] += hi - lo
                    self._add(p, lo, hi, t, s, 0)
            elif k == KIND_SHMDT:
                hit = p.find(a)
                if hit is not None:
                    self._cut(p, hit[0], hit[1], t, unmapped, True)
        return unmatched

    def remove(self, pid: int, lo: int, hi: int, ts: int) -> None:
        p = self._procs.get(pid)
        if p is not None:
            for s, e, t, site, kernel in self._take(p, lo, hi):
                if t != ts or not kernel:
                    self._insert(p, s, e, t, site, kernel)

    def drop(self, pid: int, before: int, unmapped) -> None:
        p = self._procs.get(pid)
        if p is None:
            return
        for s, e, t, site, kernel in self._take(p, 0, 1 << 64):
            if t >= before:
                self._insert(p, s, e, t, site, kernel)
            elif 0 <= site < len(unmapped):
                unmapped[site] += e - s
        p.brk = None

    def set_brk(self, pid: int, value: int) -> None:
        p = self._procs[pid]
        if p.brk is None:
            p.brk = value

    def at(self, pid: int, address: int):
        p = self._procs.get(pid)
        hit = p.find(address) if p is not None else None
        return None if hit is None else (hit[0], hit[1], hit[3], hit[2], hit[4])

    def export(self) -> bytes:
        rows = [
            (pid, s, e, t, site, kernel)
            for pid, p in self._procs.items()
            for s in p.starts
            for e, t, site, kernel in (p.items[s],)
        ]
        return np.array(rows, _EXPORT).tobytes() if rows else b""
