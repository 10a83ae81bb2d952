"""The BCC backend: compiles probes/mmap_ledger.c with the OS's python3-bpfcc and reads its maps.

BCC comes from the distribution (never the unrelated PyPI package named ``bcc``);
``ensure_bcc_importable`` links it into the running environment with a .pth file and is what
``leakhunt doctor --install`` calls. The kernel never wakes us: a thread drains the ring buffer
from its memory mapping (trace.ringbuf), and the kernel maps are read in batches into numpy
arrays, so a ledger of 100k live mappings costs milliseconds per snapshot.
``python -m leakhunt.trace.bcc PID`` prints the cflags.
"""

from __future__ import annotations

import ctypes as ct
import errno
import functools
import importlib
import importlib.util
import mmap
import os
import platform
import re
import struct
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

from leakhunt import resources
from leakhunt.errors import AccessDenied, BackendUnavailable
from leakhunt.trace.backend import TraceOptions
from leakhunt.trace.events import MAP_FIXED, MAP_FIXED_NOREPLACE, MREMAP_DONTUNMAP, SYSCALL_NUMBERS
from leakhunt.trace.kernel_backend import (
    RAW_CALLS,
    RELEASE_MAX,
    KernelLedgerBackend,
    RawDump,
    RawExemplar,
    RawLifecycle,
    root_problem,
)
from leakhunt.trace.ledger import SiteCounts
from leakhunt.trace.ringbuf import RingBufferReader
from leakhunt.trace.unwind import UserContext, libc_functions

OS_BCC = Path("/usr/lib/python3/dist-packages/bcc")
PTH_NAME = "leakhunt-os-bcc.pth"
LINK_DIR = "leakhunt-os-bcc"
PROBE = "mmap_ledger.c"
DUMP_S = 0.25
#: Ring buffer pages: 16 MiB (~70k streamed calls) keeps whatever the kernel ledger cannot resolve;
#: 64 MiB with --all-events, where it must absorb seconds of 50k calls/s while the reader is busy.
RINGBUF_PAGES = 4096
RINGBUF_PAGES_ALL_EVENTS = 16384
#: The ring of exemplars (4 KiB of stack each) and process lifecycle records: 4 MiB.
RARE_PAGES = 1024
STACK_BYTES = 4096
#: The range index (probes/range_index.h): nodes at most (~150 bytes each, allocated on use; a
#: process touching 100 GiB of address space in pieces needs ~50k); per-site call counts; the
#: unwinding rules behind path keys, and how many frames past the caller a path hashes.
IDX_MAX = 262144
#: The range index's root level (2: a root covers 512 GiB, three lookups a walk) and how many
#: roots an unmap's query walks before it streams the call instead (4: 2 TiB).
IDX_ROOT = 2
QUERY_ROOTS = 4
SITES_MAX = 16384
RULES_MAX = 16384
#: Four: libucm's hook puts three frames of its own (its dispatch) between the syscall wrapper
#: and whoever called mmap, so with three every mmap through the hook (glibc's malloc, ctypes,
#: the pool) was one path, and the stack shown was whichever came first.
PATH_DEPTH = 4
#: The words of the user stack a call copies once at its sp (512 bytes, a power of two): its
#: return address and path come from there. A read of user memory costs ~170 ns here, 8 bytes or
#: 512, and four of them per mmap were a third of the probe's cost under the storm.
STACK_TOP_WORDS = 64
#: The per-CPU memo of ra_slot and rules entries (a power of two): a call asks for up to
#: PATH_DEPTH + 1 of them, each a hash lookup when not remembered.
MEMO_SIZE = 64
#: The per-CPU memo of recent paths, by return address (a power of two): a path known there costs
#: one entry and PATH_DEPTH word compares instead of PATH_DEPTH rule lookups.
PATHS_SIZE = 16
#: The per-CPU memo of 2 MiB blocks no `full` bit above level 0 covered (a power of two): an
#: unmap of a hole in such a block asks the block's node alone (probes/range_index.h).
IDX_BLOCKS = 64
#: The per-CPU tallies of recent sites' sums (a power of two): a balanced pair's two additions
#: to its site stay there, out of the shared `sites` map, until another site takes the slot.
TALLY_SIZE = 64
#: Functions of libc and the loader whose syscall instructions get a return-address slot from CFI.
WRAPPER_FUNCTIONS = (
    "syscall",
    "mmap",
    "mmap64",
    "__mmap",
    "munmap",
    "__munmap",
    "mremap",
    "__mremap",
    "brk",
    "__brk",
    "shmat",
    "shmdt",
    "memfd_create",
)
#: The program's numbering, handed to it as -D: record types, lifecycle kinds, and the indexes of
#: its per-CPU counters (one per syscall first, in SYSCALL_NUMBERS order, then the others).
RECORDS = {"REC_CALL": 1, "REC_EXEMPLAR": 2, "REC_PROC": 3}
PROC_KINDS = {"PROC_FORK": 1, "PROC_EXEC": 2, "PROC_EXIT": 3}
_KINDS = list(SYSCALL_NUMBERS)
COUNTERS = {
    **{f"IDX_{kind.name}": i for i, kind in enumerate(_KINDS)},
    "C_FILTERED": 8,
    "C_FAILED": 9,
    "C_FULL": 10,
    "C_LOST_CALL": 11,
    "C_LOST_EXEMPLAR": 12,
    "C_LOST_PROC": 13,
    "C_UNTRACKED": 14,
    "C_STEP_FAILED": 15,
    "C_COUNT": 16,
}
#: The programs after the entry (probes/mmap_ledger.c) that update the range index, each reached
#: by tail call through the `steps` array: name -> (index, function).
STEPS = {
    "STEP_CLEAR": (0, "step_clear"),
    "STEP_ZAP": (1, "step_zap"),
    "STEP_SET": (2, "step_set"),
    "STEP_QUERY": (3, "step_query"),
    "STEP_NURSERY": (4, "step_nursery"),
}
#: The nursery's claim words (probes/mmap_ledger.c): below NURSERY_FIRST a slot holds no mapping.
NURSERY_WORDS = {"NURSERY_EMPTY": 0, "NURSERY_CANCELLED": 1, "NURSERY_BUSY": 2, "NURSERY_FIRST": 4096}
_C_FILTERED, _C_FAILED, _C_FULL = COUNTERS["C_FILTERED"], COUNTERS["C_FAILED"], COUNTERS["C_FULL"]
_C_UNTRACKED, _C_STEP_FAILED = COUNTERS["C_UNTRACKED"], COUNTERS["C_STEP_FAILED"]
_C_LOST_CALL, _C_LOST_EXEMPLAR, _C_LOST_PROC = (
    COUNTERS["C_LOST_CALL"],
    COUNTERS["C_LOST_EXEMPLAR"],
    COUNTERS["C_LOST_PROC"],
)

_EXEMPLAR = struct.Struct("<IIQQQQQQII")
_PROC = struct.Struct("<IIIIQ")
_PROC_NAMES = {n: name.split("_")[1].lower() for name, n in PROC_KINDS.items()}
_LIVE_KEY = np.dtype([("pid", "<u4"), ("pad", "<u4"), ("addr", "<u8")])
_LIVE_VAL = np.dtype(
    [
        ("len", "<u8"),
        ("ip", "<u8"),
        ("ra", "<u8"),
        ("path", "<u8"),
        ("ts", "<u8"),
        ("flags", "<u4"),
        ("fd", "<i4"),
    ]
)
_NURSERY = np.dtype([("addr", "<u8"), ("pid", "<u4"), ("pad", "<u4"), *_LIVE_VAL.descr])
_SITE_KEY = np.dtype([("pid", "<u4"), ("pad", "<u4"), ("ip", "<u8"), ("ra", "<u8"), ("path", "<u8")])
_SITE_VAL = np.dtype([("count", "<u8"), ("mapped", "<u8"), ("unmapped", "<u8")])
_TALLY = np.dtype(
    [("ip", "<u8"), ("ra", "<u8"), ("path", "<u8"), ("pid", "<u4"), ("used", "<u4"), *_SITE_VAL.descr]
)


def _bcc_origin() -> str | None:
    spec = importlib.util.find_spec("bcc")
    return spec.origin if spec is not None and spec.origin else None


def ensure_bcc_importable() -> str | None:
    """Make ``import bcc`` load the OS's python3-bpfcc in this interpreter's environment, adding a
    .pth file to site-packages if needed. None when it works, else one line saying why not."""
    origin = _bcc_origin()
    if origin is not None:
        if Path(origin).resolve().is_relative_to(OS_BCC.resolve()):
            return None
        return (
            f"the bcc module at {origin} is not the OS's python3-bpfcc (the PyPI package named "
            "'bcc' is unrelated): pip uninstall bcc"
        )
    if not (OS_BCC / "__init__.py").is_file():
        return "python3-bpfcc is not installed (apt-get install python3-bpfcc)"
    site = Path(sysconfig.get_paths()["purelib"])
    link_dir = site / LINK_DIR
    try:
        link_dir.mkdir(exist_ok=True)
        link = link_dir / "bcc"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(OS_BCC)
        # Only the one package goes on sys.path: all of dist-packages would shadow the venv's.
        (site / PTH_NAME).write_text(f"{link_dir}\n")
    except OSError as e:
        return f"cannot link python3-bpfcc into {site}: {e.strerror}"
    if str(link_dir) not in sys.path:
        sys.path.append(str(link_dir))
    importlib.invalidate_caches()
    return None if _bcc_origin() is not None else f"bcc still not importable after writing {site / PTH_NAME}"


def _bcc_problem() -> str | None:
    origin = _bcc_origin()
    if origin is None:
        if (OS_BCC / "__init__.py").is_file():
            return "python3-bpfcc is installed but not importable from this Python environment"
        return "python3-bpfcc is not installed"
    if not Path(origin).resolve().is_relative_to(OS_BCC.resolve()):
        return f"{origin} is not the OS's python3-bpfcc (the PyPI package named 'bcc' is unrelated)"
    return None


def _headers_problem() -> str | None:
    release = platform.release()
    if any(os.path.isdir(f"/lib/modules/{release}/{d}/include") for d in ("build", "source")):
        return None
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return None
    return f"no kernel headers for {release} (/lib/modules/{release}/build)"


def live_max(options: TraceOptions) -> int:
    """Mappings the kernel holds at most (preallocated: ~100 bytes each); the rest go to user space."""
    return int(options.extra.get("max_mappings", 65536))


def ring_pages(options: TraceOptions) -> int:
    """Ring buffer pages: TraceOptions.extra['ring_pages'] (a power of two), else by mode."""
    if options.extra.get("ring_pages"):
        return int(options.extra["ring_pages"])
    return RINGBUF_PAGES_ALL_EVENTS if options.extra.get("stream_all") else RINGBUF_PAGES


@functools.cache
def possible_cpus() -> int:
    """How many CPU numbers the kernel may use (its possible mask's highest, plus one): the
    nursery has a slot for each. Fixed at boot: read once."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
        return max(int(part.split("-")[-1]) for part in text.split(",")) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


def cflags(pid: int, options: TraceOptions | None = None) -> list[str]:
    """The -D definitions probes/mmap_ledger.c expects: the facts live in leakhunt.trace.events."""
    options = options or TraceOptions()
    defines = {
        "TARGET": pid,
        "FOLLOW": int(options.follow),
        "MIN_LEN": options.min_length,
        "STREAM_ALL": int(bool(options.extra.get("stream_all"))),
        "LIVE_MAX": live_max(options),
        "SITES_MAX": SITES_MAX,
        "IDX_MAX": IDX_MAX,
        "RULES_MAX": RULES_MAX,
        "PATH_DEPTH": PATH_DEPTH,
        "STACK_TOP_WORDS": STACK_TOP_WORDS,
        "MEMO_SIZE": MEMO_SIZE,
        "TALLY_SIZE": TALLY_SIZE,
        "PATHS_SIZE": PATHS_SIZE,
        "IDX_ROOT": IDX_ROOT,
        "IDX_ROOT_SHIFT": 21 + 9 * IDX_ROOT,
        "QUERY_ROOTS": QUERY_ROOTS,
        "IDX_BLOCKS": IDX_BLOCKS,
        "RINGBUF_PAGES": ring_pages(options),
        "RARE_PAGES": RARE_PAGES,
        "STACK_BYTES": STACK_BYTES,
        "MAP_FIXED": MAP_FIXED,
        "MAP_FIXED_NOREPLACE": MAP_FIXED_NOREPLACE,
        "MREMAP_DONTUNMAP": MREMAP_DONTUNMAP,
        "NURSERY": int(options.extra.get("nursery", True)),
        "NCPUS": possible_cpus(),
    }
    defines.update(NURSERY_WORDS)
    defines.update({f"NR_{kind.name}": nr for kind, nr in SYSCALL_NUMBERS.items()})
    defines.update(RECORDS | PROC_KINDS | COUNTERS)
    defines.update({name: index for name, (index, _) in STEPS.items()})
    defines["STEP_COUNT"] = len(STEPS)
    return [f"-D{k}={v}" for k, v in defines.items()]


def program_text() -> str:
    """probes/mmap_ledger.c with its local headers pasted in: BCC rewrites map calls
    (``map.lookup(&k)``) only in the text it is given, never in a file it includes."""
    text = resources.probe(PROBE).read_text()
    for name in re.findall(r'^#include "([\w.]+)"$', text, flags=re.M):
        text = text.replace(f'#include "{name}"', resources.probe(name).read_text())
    return text


class BccBackend(KernelLedgerBackend):
    name = "bcc"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return root_problem() or _bcc_problem() or _headers_problem()

    def __init__(self, target, options: TraceOptions) -> None:
        super().__init__(target, options)
        self.bpf = None
        self._next_dump = 0.0
        self._interval = DUMP_S
        self._installed: dict[int, int] = {}  # ip -> return-address slot the kernel reads at
        self._rules: set[int] = set()  # return addresses the kernel can step out of
        self._counters = [0] * COUNTERS["C_COUNT"]
        self._skipped = 0
        self._live_max = live_max(options)

    def start(self) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise BackendUnavailable(self.name, reason)
        from bcc import BPF  # noqa: PLC0415 - loads libbcc: only when this backend is used

        source = program_text()
        flags = cflags(self.target.pid, self.options)
        try:
            self.bpf = BPF(text=source.encode(), cflags=flags)
        except Exception as e:  # BCC raises bare Exception for compile and load errors
            raise BackendUnavailable(
                self.name, f"cannot load the BPF program: {str(e).splitlines()[0]}"
            ) from None
        try:
            steps = self.bpf[b"steps"]
            for index, function in STEPS.values():
                steps[ct.c_int(index)] = ct.c_int(
                    self.bpf.load_func(function.encode(), BPF.RAW_TRACEPOINT).fd
                )
            self.bpf[b"traced"][ct.c_uint32(self.target.pid)] = ct.c_uint8(1)
            self._install_slots(self.target.pid)
            self._ring = RingBufferReader(
                self.bpf[b"events"].map_fd, ring_pages(self.options) * mmap.PAGESIZE, RAW_CALLS.itemsize
            )
            self._rare = RingBufferReader(self.bpf[b"rare"].map_fd, RARE_PAGES * mmap.PAGESIZE)
            self._ring.start()
            self._rare.start()
            # Tracing starts here, with its readers running: not while a second of set-up above
            # lets a storm fill the ring.
            self.bpf[b"ready"][ct.c_int(0)] = ct.c_uint32(1)
        except BaseException:
            for ring in (getattr(self, "_ring", None), getattr(self, "_rare", None)):
                if ring is not None:
                    ring.close()
            self.bpf.cleanup()  # Ctrl-C or a failure while setting up: detach at once
            self.bpf = None
            raise
        self._started = True
        self._next_dump = time.monotonic()
        self._check_patched()

    def _install_slots(self, pid: int) -> None:
        """Tell the kernel where each libc wrapper keeps its return address (CFI), so the site key
        it builds holds the true caller even in non-leaf wrappers such as mremap."""
        table = self.bpf[b"ra_slot"]
        for fn in libc_functions(self.resolver.modules(pid), WRAPPER_FUNCTIONS):
            code = fn.module.read(fn.vaddr, fn.size) if fn.size else None
            at = code.find(b"\x0f\x05") if code else -1
            while at >= 0:
                # The ip the kernel sees is the instruction after `syscall`.
                rule = fn.module.rule_at(fn.vaddr + at + 2)
                slot = rule.return_slot() if rule is not None else None
                if slot is not None and 0 <= slot < 4096:
                    ip = fn.address + at + 2
                    table[ct.c_uint64(ip)] = ct.c_uint32(slot)
                    self._installed[ip] = slot
                at = code.find(b"\x0f\x05", at + 1)
        self._facts_changed()

    def _slot_installed(self, ip: int, slot: int) -> bool:
        return self._installed.get(ip) == slot

    def add_pid(self, pid: int) -> bool:
        if self.bpf is None:
            return False
        self.bpf[b"traced"][ct.c_uint32(pid)] = ct.c_uint8(1)
        try:
            self._install_slots(pid)  # an exec'd child's libc sits elsewhere: its wrappers' slots
        except (OSError, ValueError, AccessDenied):
            pass  # without them the caller is still found in user space, from the CFI
        return True

    def _on_exemplar(self, pid: int, ctx: UserContext) -> None:
        """Teach the kernel to step out of this stack's frames, so that its later calls get a
        path key of their own (the caller's caller and beyond): two paths through one caller,
        one balanced and one leaking, are then two sites with two stacks."""
        if self.bpf is None:
            return
        try:
            found = self.resolver.path_rules(pid, ctx, PATH_DEPTH)
        except (OSError, ValueError, AccessDenied):
            return
        table = self.bpf[b"rules"]
        added = False
        for pc, cfa, ra in found:
            if pc in self._rules or len(self._rules) >= RULES_MAX:
                continue
            try:
                table[ct.c_uint64(pc)] = table.Leaf(cfa, ra)
            except Exception:  # BCC raises bare Exception when the map is full
                break
            self._rules.add(pc)
            added = True
        if added:
            self._facts_changed()

    def _facts_changed(self) -> None:
        """After ra_slot or rules changed: the kernel's per-CPU memo of them starts over
        (probes/mmap_ledger.c, `facts_epoch`)."""
        epoch = self.bpf[b"facts_epoch"]
        epoch[ct.c_int(0)] = ct.c_uint64(epoch[ct.c_int(0)].value + 1)

    # -- reading -------------------------------------------------------------------------------

    @staticmethod
    def _decode(raw: bytes):
        kind = raw[0]
        if kind == RECORDS["REC_EXEMPLAR"]:
            _, pid, ts, ip, ra, sp, bp, path, nbytes, _ = _EXEMPLAR.unpack_from(raw)
            return RawExemplar(pid, ts, ip, ra, sp, bp, raw[_EXEMPLAR.size : _EXEMPLAR.size + nbytes], path)
        if kind == RECORDS["REC_PROC"]:
            _, pid, what, child, ts = _PROC.unpack_from(raw)
            return RawLifecycle(_PROC_NAMES.get(what, "?"), pid, ts, child)
        return None

    def _take(self) -> tuple[list[np.ndarray], list]:
        # The rare records first: an exemplar arrives before, or with, the calls of its site.
        records = [r for r in map(self._decode, self._rare.take()) if r is not None]
        calls = [chunk.view(RAW_CALLS).ravel() for chunk in self._ring.take(RELEASE_MAX)]
        return calls, records

    def _waiting(self) -> int:
        return self._ring.backlog

    def _read(self, timeout: float) -> tuple[list[np.ndarray], list, RawDump | None]:
        wait = min(timeout, self._next_dump - time.monotonic())
        if wait > 0:
            time.sleep(wait)
        calls, records = self._take()
        dump = None
        if time.monotonic() >= self._next_dump:
            began = time.monotonic()
            dump = self._dump()
            # Reading a big ledger costs: keep it under 5% of the time.
            self._interval = max(DUMP_S, 20 * (time.monotonic() - began))
            self._next_dump = time.monotonic() + self._interval
        return calls, records, dump

    def _dump(self) -> RawDump:
        ts = time.monotonic_ns()  # CLOCK_MONOTONIC, like bpf_ktime_get_ns: the maps are read after it
        young = self._young()  # before `live`, which a slot's mapping may move to meanwhile
        keys, vals = _lookup_all(self.bpf[b"live"], _LIVE_KEY, _LIVE_VAL, self._live_max)
        live = _newest(_live_rows(keys, vals), young)
        skeys, svals = _lookup_all(self.bpf[b"sites"], _SITE_KEY, _SITE_VAL, SITES_MAX)
        sites = {
            (int(k["pid"]), int(k["ip"]), int(k["ra"]), int(k["path"])): SiteCounts(
                int(v["count"]), int(v["mapped"]), int(v["unmapped"])
            )
            for k, v in zip(skeys, svals)
        }
        self._add_tallies(sites)
        counters = self.bpf[b"counters"]
        self._counters = [sum(counters[ct.c_int(i)]) for i in range(COUNTERS["C_COUNT"])]
        self._skipped = self._runs_skipped()
        syscalls = {kind.value: self._counters[i] for i, kind in enumerate(_KINDS) if self._counters[i]}
        if self._counters[_C_FULL]:
            self.note_once(
                "the kernel map of live mappings filled up: later mappings are tracked in user "
                "space (raise TraceOptions.extra['max_mappings'])"
            )
        if self._counters[_C_STEP_FAILED]:
            self.note_once(
                "the kernel refused a step of the BPF program: unmaps are no longer decided in the "
                "kernel, all reach user space"
            )
        if self._counters[_C_LOST_EXEMPLAR]:
            self.note_once(
                "some stack samples were dropped (ring buffer full): those callers have shallow stacks"
            )
        return RawDump(
            ts,
            live,
            sites,
            syscalls,
            self._counters[_C_FILTERED],
            self._counters[_C_FAILED],
            self._counters[_C_FULL],
            self._counters[_C_UNTRACKED],
        )

    def _add_tallies(self, sites: dict[tuple[int, int, int, int], SiteCounts]) -> None:
        """Add the sums each CPU holds for its recent sites (probes/mmap_ledger.c: `tallies`) to
        `sites`. A slot's sums that move to `sites` while we read may count twice or not at all
        in this snapshot; the next one is right again."""
        ncpus = possible_cpus()
        _, slots = _lookup_all(
            self.bpf[b"tallies"], np.dtype("<u4"), np.dtype((_TALLY, (ncpus,))), TALLY_SIZE
        )
        slots = slots.ravel()
        slots = slots[(slots["used"] != 0) & ((slots["count"] | slots["mapped"] | slots["unmapped"]) != 0)]
        for t in slots.tolist():
            ip, ra, path, pid, _, count, mapped, unmapped = t
            old = sites.get((pid, ip, ra, path), SiteCounts(0, 0, 0))
            sites[(pid, ip, ra, path)] = SiteCounts(
                old.count + count, old.mapped + mapped, old.unmapped + unmapped
            )

    def _young(self) -> list[tuple[int, ...]]:
        """The mappings in the nursery's slots (one per CPU), as `live` rows."""
        _, slots = _lookup_all(self.bpf[b"nursery"], np.dtype("<u4"), _NURSERY, possible_cpus())
        slots = slots[slots["addr"] >= NURSERY_WORDS["NURSERY_FIRST"]]
        return _live_rows(slots, slots)

    def _runs_skipped(self) -> int:
        """Runs of the sys_exit program the kernel skipped because it would have nested in one
        already running on that CPU (fdinfo's recursion_misses): each is a call not seen."""
        func = self.bpf.funcs.get(b"raw_tracepoint__sys_exit")
        try:
            with open(f"/proc/self/fdinfo/{func.fd}") as f:
                return next((int(x.split()[1]) for x in f if x.startswith("recursion_misses:")), 0)
        except (AttributeError, OSError, ValueError):
            return self._skipped

    def _lost(self) -> int:
        return self._counters[_C_LOST_CALL] + self._counters[_C_LOST_PROC] + self._skipped

    def _shutdown(self) -> tuple[list[np.ndarray], list, RawDump | None]:
        if self.bpf is None:
            return [], [], None
        # The target's pid is compiled into the program, so `traced` alone does not stop it:
        # `ready` does, once the runs under way have ended. Then the rings hold every record and
        # the final dump reads still maps: read while the program ran, a mapping made or moved
        # between two reads was in one figure and not the other.
        self.bpf[b"ready"][ct.c_int(0)] = ct.c_uint32(0)
        try:
            del self.bpf[b"traced"][ct.c_uint32(self.target.pid)]
        except KeyError:
            pass
        _wait_for_runs()
        self._ring.stop()
        self._rare.stop()
        records = [r for r in map(self._decode, self._rare.take()) if r is not None]
        calls = [chunk.view(RAW_CALLS).ravel() for chunk in self._ring.take()]
        dump = self._dump()
        self._ring.close()
        self._rare.close()
        self.bpf.cleanup()
        self.bpf = None
        return calls, records, dump


#: membarrier(2)'s MEMBARRIER_CMD_GLOBAL, which returns after an RCU grace period.
_SYS_MEMBARRIER, _MEMBARRIER_CMD_GLOBAL = 324, 1


def _wait_for_runs() -> None:
    """Return once every BPF program run under way has ended. A run holds the RCU read lock, and
    membarrier's global command waits for a grace period (synchronize_rcu). It returns at once
    on one CPU, where a run may be preempted, and is refused with nohz_full: there, and on other
    architectures, a pause far longer than any run."""
    libc = ct.CDLL(None, use_errno=True)
    synced = (
        platform.machine() == "x86_64"
        and (os.cpu_count() or 1) > 1
        and libc.syscall(_SYS_MEMBARRIER, _MEMBARRIER_CMD_GLOBAL, 0, 0) == 0
    )
    if not synced:
        time.sleep(0.05)


def _newest(live: list[tuple[int, ...]], young: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """`live` rows and the nursery's, read before them. Where both hold an address the newer
    mapping counts: the slot's, unless its CPU moved it to `live` while we read (then both are
    the same mapping), or `live` keeps a mapping there that a streamed unmap ended (user space
    drops that one by its time). A slot's mapping unmapped after its read counts until the next
    dump; read the other way round, one moved to `live` meanwhile was in neither."""
    if not young:
        return live
    rows = {(row[0], row[1]): row for row in live}
    for row in young:
        held = rows.get(row[:2])
        if held is None or held[6] < row[6]:
            rows[row[:2]] = row
    return list(rows.values())


def _live_rows(keys: np.ndarray, vals: np.ndarray) -> list[tuple[int, ...]]:
    """`live` entries as (pid, addr, len, ip, ra, path, ts, flags, fd) rows."""
    return list(
        zip(keys["pid"].tolist(), keys["addr"].tolist(), *(vals[f].tolist() for f in _LIVE_VAL.names))
    )


def _lookup_all(
    table, key_dtype: np.dtype, val_dtype: np.dtype, capacity: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every entry of a BPF hash map, read with BPF_MAP_LOOKUP_BATCH straight into numpy arrays."""
    from bcc.libbcc import lib  # noqa: PLC0415

    keys = np.zeros(capacity, key_dtype)
    vals = np.zeros(capacity, val_dtype)
    in_batch, out_batch, count = ct.c_uint32(0), ct.c_uint32(0), ct.c_uint32(0)
    total = 0
    while total < capacity:
        count.value = capacity - total
        res = lib.bpf_lookup_batch(
            table.map_fd,
            ct.byref(in_batch) if total else None,
            ct.byref(out_batch),
            ct.c_void_p(keys.ctypes.data + total * key_dtype.itemsize),
            ct.c_void_p(vals.ctypes.data + total * val_dtype.itemsize),
            ct.byref(count),
        )
        err = ct.get_errno()
        total += count.value
        if res != 0:
            if err != errno.ENOENT:
                raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
            break
        if count.value == 0:
            break
        in_batch.value = out_batch.value
    return keys[:total], vals[:total]


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m leakhunt.trace.bcc PID   (prints the cflags of probes/mmap_ledger.c)")
    print(" ".join(cflags(int(sys.argv[1]))))
