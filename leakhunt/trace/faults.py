"""Page-fault evidence (probes/page_faults.c, BCC): the code that fills memory, page by page.

Memory that an allocator reserved once and commits by touching grows with no mmap in the window;
the page fault that allocates each page is the event to follow. The kernel counts not-present
faults of the traced pids by (pid, faulting ip, 2 MiB bucket); exemplars carry a copy of the
stack, unwound here with the mmap tracer's DWARF machinery, so that a fault in memset or inside
jemalloc is put on the code above them. At high fault rates one fault in N is counted (N a power
of two, set from the rate each second) and the counts are scaled back; that is said.
"""

from __future__ import annotations

import ctypes as ct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from leakhunt.trace.events import Frame, Stack
from leakhunt.trace.perf_program import PerfProgram
from leakhunt.trace.unwind import CallerResolver, UserContext, is_wrapper_module

PROBE = "page_faults.c"
BUCKET_SHIFT = 21
FAULT_KEYS = 131072
STACK_BYTES = 4096
EXEMPLAR_EVERY = 64
#: Counted faults per second above which sampling starts (per second, all CPUs).
SAMPLED_RATE = 20_000
#: Exemplars kept per (pid, ip): enough to split a memset's faults among its callers.
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


def cflags() -> list[str]:
    defines = {
        "BUCKET_SHIFT": BUCKET_SHIFT,
        "FAULT_KEYS": FAULT_KEYS,
        "STACK_BYTES": STACK_BYTES,
        "EXEMPLAR_EVERY": EXEMPLAR_EVERY,
    }
    return [f"-D{k}={v}" for k, v in defines.items()]


class _Exemplar(ct.Structure):
    _fields_ = [
        ("pid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("ip", ct.c_uint64),
        ("sp", ct.c_uint64),
        ("bp", ct.c_uint64),
        ("addr", ct.c_uint64),
        ("nbytes", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("stack", ct.c_uint8 * STACK_BYTES),
    ]


@dataclass(frozen=True)
class Toucher:
    """Who faulted pages in: the first frame above the allocator and the string routines."""

    caller: Frame
    allocator: str | None
    stack: Stack


@dataclass
class FaultView:
    """What the fault source saw, for the correlator: pages by (pid, ip, bucket), scaled for
    sampling, and for each (pid, ip) the touchers its exemplars name."""

    pages: dict[tuple[int, int, int], float] = field(default_factory=dict)
    touchers: dict[tuple[int, int], Counter] = field(default_factory=dict)  # (pid, ip) -> Counter[Toucher]
    sampled: bool = False
    seen: int = 0


def caller_label(frame: Frame) -> tuple[str, str]:
    return _base(frame.module) or "?", frame.symbol or f"+{frame.offset:#x}"


def by_toucher(view: FaultView) -> list[tuple[tuple[str, str], float, set[str], Toucher]]:
    """Pages faulted in by each caller ((library, symbol): a (pid, ip)'s pages split over its
    exemplars' touchers), with the allocators they went through and the deepest stack seen, most
    pages first; faults of an ip without an exemplar are left out."""
    per_site: dict[tuple[int, int], float] = {}
    for (pid, ip, _bucket), pages in view.pages.items():
        per_site[(pid, ip)] = per_site.get((pid, ip), 0.0) + pages
    out: dict[tuple[str, str], list] = {}
    for site, pages in per_site.items():
        touchers = view.touchers.get(site)
        if not touchers:
            continue
        n = sum(touchers.values())
        for toucher, k in touchers.items():
            acc = out.setdefault(caller_label(toucher.caller), [0.0, set(), toucher])
            acc[0] += pages * k / n
            if toucher.allocator:
                acc[1].add(toucher.allocator)
            if toucher.allocator and not acc[2].allocator:
                acc[2] = toucher  # the stack through the allocator says more
    rows = [(label, pages, allocators, t) for label, (pages, allocators, t) in out.items()]
    return sorted(rows, key=lambda r: -r[1])


def toucher_json(label: tuple[str, str], pages: float, allocators: set[str], toucher: Toucher) -> dict:
    return {
        "library": label[0],
        "symbol": label[1],
        "allocators": sorted(allocators),
        "pages": round(pages),
        "bytes": round(pages * 4096),
        "stack": [str(f) for f in toucher.stack.frames],
    }


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
        self._base: dict[tuple[int, int, int], float] = {}  # counts folded in at an earlier rate
        self._touchers: dict[tuple[int, int], Counter] = {}
        self._lock = threading.Lock()
        self._resolver = CallerResolver()
        self._last_seen = 0
        self._last_t = 0.0
        self.sampled_ever = False
        self._final: FaultView | None = None

    def cflags(self) -> list[str]:
        return cflags()

    def setup(self) -> None:
        self.bpf[b"config"][ct.c_int(0)] = ct.c_uint64(1)
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
        """Once a second: one fault in N counted, N the power of two that keeps the counted rate
        under SAMPLED_RATE. Counts so far are folded in at their own N first."""
        now = time.monotonic()
        if now - self._last_t < 1.0:
            return
        seen = self._counter(0)
        rate = (seen - self._last_seen) / (now - self._last_t)
        self._last_seen, self._last_t = seen, now
        every = 1
        while rate / every > SAMPLED_RATE and every < 1 << 16:
            every *= 2
        if every != self.every:
            with self._lock:
                self._fold()
                self.every = every
                self.bpf[b"config"][ct.c_int(0)] = ct.c_uint64(every)
            self.sampled_ever = self.sampled_ever or every > 1

    def _fold(self) -> None:
        table = self.bpf[b"faults"]
        for k, v in table.items():
            key = (k.pid, k.ip, k.bucket)
            self._base[key] = self._base.get(key, 0.0) + v.value * self.every
        table.clear()

    def on_event(self, data) -> None:
        x = ct.cast(data, ct.POINTER(_Exemplar)).contents
        site = (int(x.pid), int(x.ip))
        with self._lock:
            counter = self._touchers.setdefault(site, Counter())
            if sum(counter.values()) >= EXEMPLARS_PER_SITE:
                return
        ctx = UserContext(int(x.ip), int(x.sp), int(x.bp), bytes(x.stack[: x.nbytes]))
        try:
            stack = self._resolver.unwind(int(x.pid), ctx)
        except Exception:  # noqa: BLE001 - the process is gone, or its maps changed
            return
        # the faulting ip is where the page was touched, not a return address: unwind() already
        # resolves the first frame as such
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
        toucher = Toucher(above or frames[0], allocator, Stack(frames[:24], stack.partial, "bpf+dwarf"))
        with self._lock:
            counter[toucher] += 1

    def view(self) -> FaultView:
        """Pages so far by (pid, ip, bucket), scaled for sampling, and the touchers (after stop:
        what it saw until then)."""
        if self.bpf is None:
            return self._final or FaultView()
        with self._lock:
            pages = dict(self._base)
            for k, v in self.bpf[b"faults"].items():
                key = (k.pid, k.ip, k.bucket)
                pages[key] = pages.get(key, 0.0) + v.value * self.every
            touchers = {site: Counter(c) for site, c in self._touchers.items()}
        return FaultView(pages, touchers, self.sampled_ever or self.every > 1, self._counter(0))
