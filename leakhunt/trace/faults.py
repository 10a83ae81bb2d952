"""Page-fault evidence (probes/page_faults.c, BCC): the code that fills memory, page by page.

Memory that an allocator reserved once and commits by touching grows with no mmap in the window;
the page fault that allocates each page is the event to follow. The kernel keeps the pages the
traced pids faulted in, by (pid, 2 MiB bucket, faulting ip), net of the pages given back since
(munmap, MADV_DONTNEED and kin, MAP_FIXED, mremap); exemplars carry a copy of the stack, unwound
here with the mmap tracer's DWARF machinery, so that a fault in memset or inside jemalloc is put on
the code above them. At high fault rates one fault in N is counted with weight N (N a power of
two, set from the rate each second); that is said.
"""

from __future__ import annotations

import bisect
import ctypes as ct
import threading
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field

from leakhunt.trace.events import (
    MADV_GIVE_BACK,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    NR_MADVISE,
    SYSCALL_NUMBERS,
    EventKind,
    Frame,
    Stack,
)
from leakhunt.trace.perf_program import PerfProgram
from leakhunt.trace.unwind import CallerResolver, UserContext, is_wrapper_module

PROBE = "page_faults.c"
BUCKET_SHIFT = 21
#: (pid, bucket) entries: 128 GiB of faulted memory, each entry about 1 KiB, allocated on use.
BUCKETS_MAX = 65536
#: Faulting ips a bucket keeps apart (the rest share one slot).
SLOTS = 14
#: Whole buckets a give-back clears in the kernel; a larger range is sent here to clear.
WHOLE_MAX = 64
STACK_BYTES = 4096
EXEMPLAR_EVERY = 64
#: Counted faults per second above which sampling starts (per second, all CPUs).
SAMPLED_RATE = 20_000
#: The largest sampling shift: one fault in 2**15 (an owner byte holds the shift in 4 bits).
MAX_SHIFT = 15
#: Exemplars kept per (pid, site): enough to split a site's faults among its callers' callers.
EXEMPLARS_PER_SITE = 64

#: Allocator families, by the module their code is in (or, for pymalloc, by function).
ALLOCATOR_MODULES = {
    "libjemalloc": "jemalloc",
    "libmimalloc": "mimalloc",
    "libtcmalloc": "tcmalloc",
}
PYMALLOC_SYMBOLS = (
    "_PyObject_Malloc",
    "pymalloc_",
    "new_arena",
    "_PyObject_Calloc",
    "_PyMem_",
    "_PyObject_Arena",
    "allocate_from_new_pool",
)
GLIBC_MALLOC_SYMBOLS = (
    "malloc",
    "__libc_malloc",
    "calloc",
    "__libc_calloc",
    "realloc",
    "_int_malloc",
    "_int_realloc",
    "sysmalloc",
    "tcache",
    "sbrk",
    "__sbrk",
    "brk",
    "__brk",
    "new_heap",
    "grow_heap",
    "alloc_new_heap",
    "arena_get2",
)


def _base(path: str | None) -> str:
    return (path or "").rsplit("/", 1)[-1]


def allocator_of(frame: Frame) -> str | None:
    """The allocator family a frame belongs to, None for any other code."""
    name = _base(frame.module)
    for prefix, family in ALLOCATOR_MODULES.items():
        if name.startswith(prefix):
            return family
    symbol = frame.symbol or ""
    if name.startswith("libpython") and symbol.startswith(PYMALLOC_SYMBOLS):
        return "pymalloc"
    if is_wrapper_module(frame.module) and symbol.startswith(GLIBC_MALLOC_SYMBOLS):
        return "glibc malloc"
    return None


def _is_machinery(frame: Frame) -> bool:
    """Frames that only move bytes or hand out memory: the culprit is above them."""
    return (
        is_wrapper_module(frame.module)
        or allocator_of(frame) is not None
        or _base(frame.module).startswith("libstdc++")
    )


PYTHON_OBJECTS = "Python objects (pymalloc)"


def _is_interpreter(frame: Frame) -> bool:
    name = _base(frame.module)
    return name.startswith("libpython") or name.startswith("python3")


def toucher_of(resolver: CallerResolver, pid: int, ctx: UserContext) -> Toucher | None:
    """The code above the allocator and the string routines in an exemplar's stack (None when the
    process is gone or its maps changed). The faulting ip is where the page was touched, not a
    return address: unwind() resolves the first frame as such."""
    try:
        stack = resolver.unwind(pid, ctx)
    except Exception:  # noqa: BLE001 - the process is gone, or its maps changed
        return None
    frames = stack.frames
    allocator = next((a for a in map(allocator_of, frames) if a), None)
    if allocator == "pymalloc":
        # The interpreter's frames only say "a Python object": the culprit is an extension
        # module above them, or the Python heap itself (memray names the Python line).
        above = next((f for f in frames if not _is_machinery(f) and not _is_interpreter(f)), None)
        if above is None:
            interpreter = next(f for f in frames if _is_interpreter(f))
            above = Frame(interpreter.address, interpreter.module, PYTHON_OBJECTS, 0)
    else:
        above = next((f for f in frames if not _is_machinery(f)), None)
    return Toucher(above or frames[0], allocator, Stack(frames[:24], stack.partial, "bpf+dwarf"))


def cflags() -> list[str]:
    defines = {
        "BUCKET_SHIFT": BUCKET_SHIFT,
        "BUCKETS_MAX": BUCKETS_MAX,
        "SLOTS": SLOTS,
        "WHOLE_MAX": WHOLE_MAX,
        "STACK_BYTES": STACK_BYTES,
        "EXEMPLAR_EVERY": EXEMPLAR_EVERY,
        "NR_MADVISE": NR_MADVISE,
        "MAP_FIXED": MAP_FIXED,
        "MAP_FIXED_NOREPLACE": MAP_FIXED_NOREPLACE,
        **MADV_GIVE_BACK,
    }
    defines.update(
        {f"NR_{k.name}": SYSCALL_NUMBERS[k] for k in (EventKind.MMAP, EventKind.MUNMAP, EventKind.MREMAP)}
    )
    return [f"-D{k}={v}" for k, v in defines.items()]


class _Exemplar(ct.Structure):
    _fields_ = [
        ("pid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("ip", ct.c_uint64),
        ("ra", ct.c_uint64),
        ("sp", ct.c_uint64),
        ("bp", ct.c_uint64),
        ("addr", ct.c_uint64),
        ("nbytes", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("stack", ct.c_uint8 * STACK_BYTES),
    ]


#: Where pages were faulted in: (faulting ip, return address of the function it is in; 0 until
#: the kernel was told where that is).
Site = tuple[int, int]


class _Range(ct.Structure):
    _fields_ = [("pid", ct.c_uint32), ("pad", ct.c_uint32), ("first", ct.c_uint64), ("count", ct.c_uint64)]


@dataclass(frozen=True)
class Toucher:
    """Who faulted pages in: the first frame above the allocator and the string routines."""

    caller: Frame
    allocator: str | None
    stack: Stack


@dataclass
class FaultView:
    """What the fault source saw, for the correlator: pages by (pid, ip, bucket), scaled for
    sampling, and for each (pid, site) the touchers its exemplars name. A site is (faulting ip,
    return address of its function), ``Site`` here."""

    pages: dict[tuple[int, Site, int], float] = field(default_factory=dict)  # live, net of give-backs
    touchers: dict[tuple[int, Site], Counter] = field(default_factory=dict)  # -> Counter[Toucher]
    sampled: bool = False
    seen: int = 0  # faults seen
    given_back: int = 0  # counted pages given back since (munmap, MADV_DONTNEED, ...), in weight
    dropped: int = 0  # faults not counted (the bucket table was full)
    netted: bool = True  # False: counts of faults, pages given back not taken off (bpftrace)


def caller_label(frame: Frame) -> tuple[str, str]:
    return _base(frame.module) or "?", frame.symbol or f"+{frame.offset:#x}"


class MappedBy:
    """Which allocator mapped the memory of a bucket: the traced mappings still held whose stacks go
    through an allocator, per pid, sorted by address. An allocator that hands out pages it mapped
    earlier need not fault in its own code while it is traced (jemalloc's large allocations are
    touched only by their callers): the mmap that made the memory names it."""

    def __init__(self, held: Iterable[tuple[int, int, int, Stack | None]]) -> None:
        per_pid: dict[int, list[tuple[int, int, str, Stack]]] = {}
        for pid, start, end, stack in held:
            allocator = next((a for a in map(allocator_of, stack.frames) if a), None) if stack else None
            if allocator:
                per_pid.setdefault(pid, []).append((start, end, allocator, stack))
        self._ranges = {pid: sorted(ranges, key=lambda r: r[0]) for pid, ranges in per_pid.items()}
        self._starts = {pid: [r[0] for r in ranges] for pid, ranges in self._ranges.items()}

    def bucket(self, pid: int, bucket: int) -> tuple[str, Stack] | None:
        """(allocator, its mmap's stack) for a held allocator mapping in the bucket, else None."""
        starts = self._starts.get(pid)
        if not starts:
            return None
        lo, hi = bucket << BUCKET_SHIFT, (bucket + 1) << BUCKET_SHIFT
        i = bisect.bisect_left(starts, hi) - 1  # the last mapping starting below the bucket's end
        if i >= 0 and self._ranges[pid][i][1] > lo:
            return self._ranges[pid][i][2:]
        return None


def by_toucher(
    view: FaultView, mapped_by: MappedBy | None = None
) -> list[tuple[tuple[str, str], float, set[str], Toucher]]:
    """Pages faulted in by each caller ((library, symbol): a (pid, site)'s pages split over its
    exemplars' touchers), with the allocators they went through and the deepest stack seen, most
    pages first; faults of an ip without an exemplar are left out. ``mapped_by``: the traced
    mappings, whose allocators count for the pages faulted in them."""
    per_site: dict[tuple[int, Site], float] = {}
    mapping: dict[tuple[int, Site], tuple[str, Stack]] = {}
    for (pid, site, bucket), pages in view.pages.items():
        per_site[(pid, site)] = per_site.get((pid, site), 0.0) + pages
        if mapped_by is not None and pages > 0 and (pid, site) not in mapping:
            found = mapped_by.bucket(pid, bucket)
            if found:
                mapping[(pid, site)] = found
    # The allocator a caller goes through shows in the exemplars of the allocator's own faults,
    # whose pages may all have been given back or faulted again by the caller since: every
    # exemplar counts for naming it, live pages or not.
    through = allocators_by_caller(view)
    out: dict[tuple[str, str], list] = {}
    for site, pages in per_site.items():
        touchers = view.touchers.get(site)
        if not touchers:
            continue
        n = sum(touchers.values())
        for toucher, k in touchers.items():
            label = caller_label(toucher.caller)
            allocators, via = through.get(label, (set(), None))
            acc = out.setdefault(label, [0.0, set(allocators), via or toucher])
            acc[0] += pages * k / n
            if toucher.allocator and acc[2] is via:
                acc[2] = toucher  # a stack through the allocator says more; one with live pages most
            if site in mapping:
                allocator, stack = mapping[site]
                acc[1].add(allocator)
                if not acc[2].allocator:  # no exemplar went through it: show the mmap that did
                    acc[2] = Toucher(acc[2].caller, allocator, stack)
    rows = [(label, pages, allocators, t) for label, (pages, allocators, t) in out.items()]
    return sorted(rows, key=lambda r: -r[1])


def allocators_by_caller(view: FaultView) -> dict[tuple[str, str], tuple[set[str], Toucher]]:
    """(library, symbol) -> the allocators any exemplar of that caller went through, and one such
    exemplar (its stack shows the allocator)."""
    out: dict[tuple[str, str], tuple[set[str], Toucher]] = {}
    for touchers in view.touchers.values():
        for toucher in touchers:
            if toucher.allocator:
                out.setdefault(caller_label(toucher.caller), (set(), toucher))[0].add(toucher.allocator)
    return out


class FaultTracer(PerfProgram):
    """Runs probes/page_faults.c for a set of pids."""

    probe = PROBE
    buffer = b"exemplars"
    pages = 256
    poll_ms = 200

    def __init__(self, pids: tuple[int, ...]) -> None:
        super().__init__()
        self.pids = set(pids)
        self.every = 1
        self._touchers: dict[tuple[int, Site], Counter] = {}
        self._slotted: set[int] = set()  # ips whose return-address slot was looked up
        self._slots_installed = 0
        self._lock = threading.Lock()
        self._resolver = CallerResolver()
        self._last_seen = 0
        self._last_t = 0.0
        self.sampled_ever = False
        self._final: FaultView | None = None

    def cflags(self) -> list[str]:
        return cflags()

    def setup(self) -> None:
        from bcc import BPF  # noqa: PLC0415 - loaded by PerfProgram.start already

        self.bpf[b"config"][ct.c_int(0)] = ct.c_uint64(0)
        give_back = self.bpf.load_func(b"give_back", BPF.RAW_TRACEPOINT)
        self.bpf[b"steps"][ct.c_int(0)] = ct.c_int(give_back.fd)
        self.bpf[b"ranges"].open_perf_buffer(lambda _cpu, data, _size: self._on_range(data), page_cnt=8)
        with self._lock:
            for pid in self.pids:
                self.bpf[b"traced"][ct.c_uint32(pid)] = ct.c_uint8(1)
        self._last_t = time.monotonic()

    def tick(self) -> None:
        self._adapt()

    def finish(self) -> None:
        self._final = self.view()

    def add_pid(self, pid: int) -> None:
        """Trace this pid too (before start: it is installed with the others)."""
        with self._lock:
            self.pids.add(pid)
            if self.bpf is not None:
                self.bpf[b"traced"][ct.c_uint32(pid)] = ct.c_uint8(1)

    def _counter(self, i: int) -> int:
        return int(sum(getattr(v, "value", v) for v in self.bpf[b"counters"][ct.c_int(i)]))

    def _adapt(self) -> None:
        """Once a second: one fault in N counted (with weight N), N the power of two that keeps
        the counted rate under SAMPLED_RATE. Pages keep the weight they were counted with, so a
        change of N needs nothing else."""
        now = time.monotonic()
        if now - self._last_t < 1.0:
            return
        seen = self._counter(0)
        rate = (seen - self._last_seen) / (now - self._last_t)
        self._last_seen, self._last_t = seen, now
        shift = 0
        while rate / (1 << shift) > SAMPLED_RATE and shift < MAX_SHIFT:
            shift += 1
        if 1 << shift != self.every:
            self.every = 1 << shift
            self.bpf[b"config"][ct.c_int(0)] = ct.c_uint64(shift)
            self.sampled_ever = self.sampled_ever or shift > 0

    def _on_range(self, data) -> None:
        """A large range given back: its whole buckets go (the kernel cleared the edges)."""
        r = ct.cast(data, ct.POINTER(_Range)).contents
        table = self.bpf[b"buckets"]
        lo, hi = int(r.first), int(r.first) + int(r.count)
        gone = [k for k in table.keys() if k.pid == r.pid and lo <= k.bucket < hi]
        for k in gone:
            with suppress(KeyError):
                del table[k]

    def on_event(self, data) -> None:
        x = ct.cast(data, ct.POINTER(_Exemplar)).contents
        pid, ip = int(x.pid), int(x.ip)
        site = (pid, (ip, int(x.ra)))
        with self._lock:
            counter = self._touchers.setdefault(site, Counter())
            if sum(counter.values()) >= EXEMPLARS_PER_SITE:
                return
        if ip not in self._slotted:
            # A fault in code that only moves bytes or hands out memory (memset, an allocator):
            # from now on the kernel tells its callers apart by its return address. Elsewhere the
            # ip says enough, and the user-stack read it would cost every fault is spared.
            self._slotted.add(ip)
            with suppress(Exception):
                if _is_machinery(self._resolver.modules(pid).frame(ip, is_return=False)):
                    slot = self._resolver.return_slot(pid, ip)
                    if slot is not None and self.bpf is not None:
                        self.bpf[b"ra_slot"][ct.c_uint64(ip)] = ct.c_uint32(slot)
                        self._slots_installed += 1  # the kernel's per-CPU caches start again
                        self.bpf[b"config"][ct.c_int(1)] = ct.c_uint64(self._slots_installed)
        toucher = toucher_of(
            self._resolver, pid, UserContext(ip, int(x.sp), int(x.bp), bytes(x.stack[: x.nbytes]))
        )
        if toucher is None:
            return
        with self._lock:
            counter[toucher] += 1
            enough = sum(counter.values()) >= EXEMPLARS_PER_SITE
        if enough and self.bpf is not None:
            with suppress(Exception):  # the kernel stops sending this site's exemplars
                self.bpf[b"seen"][self.bpf[b"seen"].Key(pid, 0, *site[1])] = ct.c_uint8(2)

    def view(self) -> FaultView:
        """Live pages so far by (pid, ip, bucket), in counted weight, and the touchers (after
        stop: what it saw until then)."""
        if self.bpf is None:
            return self._final or FaultView()
        pages: dict[tuple[int, Site, int], float] = {}
        for k, v in self.bpf[b"buckets"].items():
            for slot in range(SLOTS + 1):
                if v.weight[slot] > 0:
                    key = (k.pid, (int(v.ip[slot]), int(v.ra[slot])), k.bucket)
                    pages[key] = pages.get(key, 0.0) + v.weight[slot]
        with self._lock:
            touchers = {site: Counter(c) for site, c in self._touchers.items()}
        return FaultView(
            pages,
            touchers,
            self.sampled_ever or self.every > 1,
            self._counter(0),
            self._counter(1),
            self._counter(2),
        )
