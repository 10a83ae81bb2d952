"""What the bpftrace and BCC backends share: both keep the ledger's common case in the kernel and
send the rest as raw records; this turns them into ordered batches of calls with named sites.

A backend subclass only launches its program, reads raw records and reads the kernel's maps.
Calls travel as numpy rows (RAW_CALLS, the BCC probe's own record layout) and reach the ledger
as a CALLS batch, never one object per call: at a storm's rate Python objects cost more than the
kernel's whole work. Order matters (an unmap applied before its map would leave a false leak)
and per-CPU buffers do not keep it, so streamed calls are held back until a kernel snapshot newer
than them exists, then released sorted by time, together with that snapshot. A poll releases at
most RELEASE_MAX calls, so it returns in bounded time whatever the rate; what it leaves waits
for the next one and is reported as the backlog.

TraceOptions.extra keys both read: ``stream_all`` (every call to user space: --all-events) and
``max_mappings`` (mappings the kernel holds); bcc also ``ring_pages``, bpftrace ``perf_pages``.
"""

from __future__ import annotations

import os
import time
from abc import abstractmethod
from typing import NamedTuple

import numpy as np

from leakhunt.errors import AccessDenied
from leakhunt.proc.target import PROC, shm_segment_size
from leakhunt.trace.backend import Backend, TraceOptions
from leakhunt.trace.events import SYSCALL_NUMBERS, EventKind, Frame, MmapEvent, Stack
from leakhunt.trace.ledger import (
    CALLS,
    KINDS,
    KernelMapping,
    KernelState,
    Lifecycle,
    SiteCounts,
    SiteKey,
)
from leakhunt.trace.patched import find_patched, patched_note
from leakhunt.trace.unwind import CallerResolver, UserContext

#: A fork/exec/exit record as the kernel sends it (kernel monotonic ns until converted).
RawLifecycle = Lifecycle

#: The inode of the kernel's initial pid namespace (PROC_PID_INIT_INO), the one BPF's pids live in.
INIT_PID_NS_INO = 0xEFFFFFFC

#: Streamed records are released once a snapshot is this much newer than them: per-CPU buffers
#: are read within microseconds, this leaves room for a reader descheduled on a busy machine.
HOLDBACK_NS = 50_000_000
#: Calls one poll hands to the ledger at most (~0.1 s of work on this 2-core machine).
RELEASE_MAX = 100_000

#: A streamed call as the BCC probe's ring buffer carries it (struct call_rec_t).
RAW_CALLS = np.dtype(
    [
        ("type", "<u4"),
        ("pid", "<u4"),
        ("tid", "<u4"),
        ("nr", "<u4"),
        ("ts", "<u8"),
        ("a0", "<u8"),
        ("a1", "<u8"),
        ("a2", "<u8"),
        ("a3", "<u8"),
        ("a4", "<u8"),
        ("ret", "<i8"),
        ("ip", "<u8"),
        ("sp", "<u8"),
        ("ra", "<u8"),
        ("path", "<u8"),
        ("nwords", "<u8"),
        ("words", "<u8", (16,)),
    ]
)
#: The ledger's kind of each syscall number (0: nothing to apply, memfd_create).
_KIND_OF_NR = np.zeros(512, np.uint8)
for _kind, _code in KINDS.items():
    _KIND_OF_NR[SYSCALL_NUMBERS[_kind]] = _code
_SITE_KINDS = [SYSCALL_NUMBERS[k] for k in (EventKind.MMAP, EventKind.MREMAP, EventKind.BRK, EventKind.SHMAT)]


class RawCall(NamedTuple):
    """A syscall the kernel side did not resolve itself, with the stack words above sp."""

    nr: int
    pid: int
    tid: int
    ts: int  # kernel monotonic ns
    args: tuple[int, int, int, int, int]
    ret: int
    ip: int
    sp: int
    ra: int  # what the kernel read as the return address (the site key's third part)
    words: bytes
    path: int = 0  # the kernel's hash of the frames past the caller (the site key's fourth part)


def raw_calls(records: list[RawCall]) -> np.ndarray:
    """RawCall objects (the bpftrace backend's, parsed from text) as RAW_CALLS rows."""
    out = np.zeros(len(records), RAW_CALLS)
    for i, r in enumerate(records):
        row = out[i]
        row["pid"], row["tid"], row["nr"], row["ts"] = r.pid, r.tid, r.nr, r.ts
        row["a0"], row["a1"], row["a2"], row["a3"], row["a4"] = r.args
        row["ret"], row["ip"], row["sp"], row["ra"], row["path"] = r.ret, r.ip, r.sp, r.ra, r.path
        words = np.frombuffer(r.words[:128], "<u8")
        row["nwords"] = len(words)
        row["words"][: len(words)] = words
    return out


class RawExemplar(NamedTuple):
    """The first call from a site, with a larger copy of the stack for DWARF unwinding."""

    pid: int
    ts: int
    ip: int
    ra: int  # what the kernel used as the return address (the site key's third part)
    sp: int
    bp: int
    stack: bytes
    path: int = 0  # the path this exemplar stands for


class RawDump(NamedTuple):
    """The kernel maps, read after ``ts`` (kernel monotonic ns)."""

    ts: int
    live: list[tuple[int, ...]]  # pid, addr, len, ip, ra, path, ts, flags, fd
    sites: dict[SiteKey, SiteCounts]
    syscalls: dict[str, int]
    filtered: int
    failed: int
    full: int
    untracked: int = 0  # unmaps the kernel found touching nothing tracked (holes, older memory)


def root_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_BPF and CAP_PERFMON)"
    problem = pid_namespace_problem()
    if problem:
        return problem
    if not os.path.isdir("/sys/kernel/tracing/events/raw_syscalls") and not os.path.isdir(
        "/sys/kernel/debug/tracing/events/raw_syscalls"
    ):
        return "tracefs with the raw_syscalls tracepoints is not mounted"
    return None


def pid_namespace_problem() -> str | None:
    """The probes compare the kernel's global pids (bpf_get_current_pid_tgid): a target's pid is
    one of those only when our /proc is the initial pid namespace's. From a container's own /proc,
    every pid we are given is another number to the kernel and the probes would see nothing."""
    try:
        ino = os.stat(PROC / "1" / "ns" / "pid").st_ino
    except OSError:
        return None  # cannot tell (no /proc/1/ns access): let the attach speak for itself
    if ino == INIT_PID_NS_INO:
        return None
    return (
        "leakhunt runs in a pid namespace of its own (a container) and BPF sees the host's pids: run it "
        "on the host, or in a container that shares the host's pid namespace (docker run --pid=host)"
    )


class KernelLedgerBackend(Backend):
    """Base of the BPF backends: ordering, caller resolution, kernel state."""

    def __init__(self, target, options: TraceOptions) -> None:
        super().__init__(target, options)
        self.resolver = CallerResolver()
        self._pending: list[np.ndarray] = []  # RAW_CALLS chunks not released yet
        self._lifecycle: list[RawLifecycle] = []
        self._exemplars: dict[SiteKey, UserContext] = {}
        self._site_info: dict[SiteKey, tuple[Frame, Stack]] = {}
        self._shallow_info: dict[SiteKey, tuple[Frame, Stack]] = {}
        self._state: KernelState | None = None
        # Kernel timestamps are CLOCK_MONOTONIC; records carry wall-clock time.
        self._wall_offset_ns = time.time_ns() - time.monotonic_ns()
        self._exited = False
        self._started = False
        self._stopped = False
        self._final_dump: RawDump | None = None
        self._last_dump: RawDump | None = None
        self._ip_checked = False
        self._batch_callers: dict[SiteKey, tuple[Frame, Stack]] = {}  # streamed sites, for the next state

    # -- what subclasses provide ---------------------------------------------------------------

    @abstractmethod
    def _read(self, timeout: float) -> tuple[list[np.ndarray], list, RawDump | None]:
        """Calls that arrived (RAW_CALLS chunks), the other raw records (RawExemplar,
        RawLifecycle) and the newest complete dump of the kernel maps, if one was taken; waits
        up to ``timeout`` for a dump."""

    @abstractmethod
    def _shutdown(self) -> tuple[list[np.ndarray], list, RawDump | None]:
        """Detach; the records that arrived meanwhile and a final dump (None if none came)."""

    @abstractmethod
    def _lost(self) -> int:
        """Records the kernel or the transport dropped so far, counted exactly."""

    def _waiting(self) -> int:
        """Records read from the kernel but not handed over by _read yet (the transport's own)."""
        return 0

    # -- Backend -------------------------------------------------------------------------------

    def poll(self, timeout: float) -> np.ndarray:
        """A batch of calls (ledger CALLS rows, in time order), and with it kernel_state()."""
        if self._stopped:
            # After stop(): what arrived while detaching, with the final state; RELEASE_MAX at
            # a time, so that a caller with a deadline can leave the rest (the backlog).
            return self._release(None, self._final_dump)
        calls, records, dump = self._read(timeout)
        self._absorb(calls, records)
        if dump is None:
            return np.zeros(0, CALLS)
        return self._release(dump.ts - HOLDBACK_NS, dump)

    def stop(self) -> None:
        if self._stopped or not self._started:
            return
        self._stopped = True
        calls, records, self._final_dump = self._shutdown()
        self._absorb(calls, records)

    @property
    def backlog(self) -> int:
        """Calls read from the kernel and not handed to the ledger yet."""
        return sum(len(c) for c in self._pending) + self._waiting()

    def kernel_state(self) -> KernelState | None:
        return self._state

    def details(self) -> dict:
        dump = self._last_dump
        return {
            "mode": "all-events" if self.options.extra.get("stream_all") else "kernel-ledger",
            "kernel_held_mappings": len(self._state.mappings) if self._state else 0,
            "sites": len(self._state.sites) if self._state else 0,
            "failed_calls": dump.failed if dump else 0,
            "kernel_map_full": dump.full if dump else 0,
            "exemplars": len(self._exemplars),
            "backlog": self.backlog,
        }

    @property
    def target_exited(self) -> bool:
        return self._exited or not self.target.alive()

    def _absorb(self, calls: list[np.ndarray], records: list) -> None:
        for chunk in calls:
            if len(chunk):
                self._pending.append(chunk)
                if not self._ip_checked:
                    self._check_ip(int(chunk["pid"][0]), int(chunk["ip"][0]))
        for r in records:
            if isinstance(r, RawExemplar):
                key = (r.pid, r.ip, r.ra, r.path)
                if key not in self._exemplars:
                    self._exemplars[key] = UserContext(r.ip, r.sp, r.bp, r.stack)
                    self._on_exemplar(r.pid, self._exemplars[key])
                self._check_ip(r.pid, r.ip)
            elif isinstance(r, RawLifecycle):
                self._on_lifecycle(r)
        self.stats.lost_events = self._lost()

    def _release(self, cutoff: int | None, dump: RawDump | None) -> np.ndarray:
        """Calls older than ``cutoff`` (all with None) in time order, RELEASE_MAX at most; then
        the kernel state, complete up to the first call held back."""
        pending = (
            self._pending[0]
            if len(self._pending) == 1
            else np.concatenate(self._pending or [np.zeros(0, RAW_CALLS)])
        )
        if cutoff is not None:
            late = pending["ts"] >= cutoff
            ready, rest = pending[~late], pending[late]
        else:
            ready, rest = pending, pending[:0]
        ready = ready[np.argsort(ready["ts"], kind="stable")]
        complete = cutoff
        if len(ready) > RELEASE_MAX:
            rest = np.concatenate([ready[RELEASE_MAX:], rest])
            ready = ready[:RELEASE_MAX]
        if len(rest):
            first = int(rest["ts"].min())
            complete = first if complete is None else min(complete, first)
        self._pending = [rest] if len(rest) else []
        calls = self._calls(ready)
        if dump is not None:
            self._last_dump = dump
            self._state = self._kernel_state(dump, complete)
            self.stats.events = sum(dump.syscalls.values())
            self.stats.filtered = dump.filtered
            self.stats.untracked = dump.untracked
        self.stats.lost_events = self._lost()
        self.stats.backlog = self.backlog
        self.stats.complete_until = None if not self.stats.backlog else self._wall(complete) / 1e9
        return calls

    def _calls(self, raw: np.ndarray) -> np.ndarray:
        """RAW_CALLS rows as the ledger's CALLS rows; the sites among them described."""
        wanted = np.zeros(512, bool)
        wanted[[SYSCALL_NUMBERS[k] for k in self.options.kinds]] = True
        raw = raw[wanted[raw["nr"] & 511]]
        out = np.zeros(len(raw), CALLS)
        if not len(raw):
            return out
        nr = raw["nr"] & 511
        kind = _KIND_OF_NR[nr]
        shmat = nr == SYSCALL_NUMBERS[EventKind.SHMAT]
        mremap = nr == SYSCALL_NUMBERS[EventKind.MREMAP]
        mmap_like = (nr == SYSCALL_NUMBERS[EventKind.MMAP]) | mremap
        out["ts"] = raw["ts"].astype(np.int64) + self._wall_offset_ns
        out["pid"], out["kind"], out["ret"] = raw["pid"], kind, raw["ret"]
        out["addr"] = np.where(shmat, raw["a1"], raw["a0"])
        out["length"] = np.where(kind <= 3, raw["a1"], 0)  # mmap, munmap, mremap
        out["arg"] = np.where(mremap, raw["a2"], 0)
        out["flags"] = np.where(mmap_like, raw["a3"], np.where(shmat, raw["a2"], 0))
        out["ip"], out["ra"], out["path"] = raw["ip"], raw["ra"], raw["path"]
        for i in np.flatnonzero(shmat):
            r = raw[i]
            out["arg"][i] = _shm_length(int(r["pid"]), int(r["ret"]), int(r["a0"]))
        self._describe_new(raw[np.isin(nr, _SITE_KINDS)])
        return out

    def _describe_new(self, raw: np.ndarray) -> None:
        """Callers and stacks of the sites of streamed calls not described yet (for the state)."""
        if not len(raw):
            return
        keys = raw[["pid", "ip", "ra", "path"]]
        _, first = np.unique(keys, return_index=True)
        for i in first:
            r = raw[i]
            key = (int(r["pid"]), int(r["ip"]), int(r["ra"]), int(r["path"]))
            if key in self._site_info or key in self._batch_callers:
                continue
            words = r["words"][: int(r["nwords"])].tobytes()
            ctx = UserContext(key[1], int(r["sp"]), 0, words)
            self._batch_callers[key] = self.describe(*key, ctx)

    def to_events(self, calls: np.ndarray) -> list[MmapEvent]:
        """A batch as MmapEvents (for recordings), with each site's caller and stack."""
        names = {code: kind for kind, code in KINDS.items()}
        out = []
        for row in calls.tolist():
            ts, pid, code, addr, length, arg, flags, ret, ip, ra, path = row
            kind = names.get(code, EventKind.MEMFD_CREATE)
            caller, stack = self.describe(pid, ip, ra, path)
            if not self.options.stacks:
                stack = Stack(stack.frames[:2], True, stack.source)
            fields = dict(addr=addr, length=length, flags=flags)
            if kind is EventKind.MREMAP:
                fields["new_length"] = arg
            elif kind is EventKind.SHMAT:
                fields["length"] = arg
            out.append(
                MmapEvent(ts / 1e9, pid, 0, kind, ret=ret, stack=stack, caller=caller, path=path, **fields)
            )
        return out

    def _on_exemplar(self, pid: int, ctx: UserContext) -> None:
        """A first stack of a new site (bcc learns the unwinding rules of its frames from it)."""

    def _check_ip(self, pid: int, ip: int) -> None:
        """Once: the user ip the probe read must follow a syscall instruction. If it does not,
        the probe found the wrong pt_regs (an unusual kernel stack layout) and callers are wrong."""
        if self._ip_checked:
            return
        where = self.resolver.modules(pid).locate(ip)
        if where is None:
            return
        self._ip_checked = True
        if where[1].read(where[2] - 2, 2) not in (b"\x0f\x05", None):
            self.note_once(
                f"the user ip the probe read ({ip:#x}) does not follow a syscall instruction: "
                "callers are unreliable on this kernel (pt_regs layout)"
            )

    # -- conversion ----------------------------------------------------------------------------

    def _wall(self, ns: int) -> int:
        return ns + self._wall_offset_ns

    def _on_lifecycle(self, r: RawLifecycle) -> None:
        if r.kind == "fork":
            return  # the kernel side follows it already; its address space starts as a copy
        if r.kind == "exec":
            self.resolver.forget(r.pid)
        if r.kind == "exit" and r.pid == self.target.pid:
            self._exited = True
            return  # what the target held when it exited is the evidence: keep it
        self._lifecycle.append(r._replace(ts=self._wall(r.ts)))

    def _caller_ra(self, pid: int, ip: int, key_ra: int, ctx: UserContext | None) -> int:
        """The wrapper's return address: the kernel's word when the CFI says the slot is sp+0
        (every glibc leaf wrapper), else the word at the CFI slot in a copied stack."""
        try:
            slot = self.resolver.return_slot(pid, ip)
        except (OSError, ValueError):
            slot = None
        if slot in (None, 0) or self._slot_installed(ip, slot):
            return key_ra
        if ctx is not None:
            word = ctx.word(ctx.sp + slot)
            if word is not None:
                return word
        return key_ra

    def _slot_installed(self, ip: int, slot: int) -> bool:
        """Whether the kernel already read the return address at ``slot`` for this ip (BCC)."""
        return False

    def describe(
        self, pid: int, ip: int, key_ra: int, path: int = 0, ctx: UserContext | None = None
    ) -> tuple[Frame, Stack]:
        """Caller and stack of a site, cached once an exemplar stack has been unwound. Each path
        (the kernel's hash of the frames past the caller) has an exemplar of its own, so the
        stack of a path is that path's, not the first one through the same wrapper and caller."""
        key = (pid, ip, key_ra, path)
        hit = self._site_info.get(key)
        if hit is not None:
            return hit
        exemplar = self._exemplars.get(key)
        if exemplar is None:
            # No exemplar (yet, or ever: unmaps send none): the event's own 16 words give the
            # caller and a frame or two; kept until an exemplar arrives for this site.
            shallow = self._shallow_info.get(key)
            if shallow is not None:
                return shallow
        ra = self._caller_ra(pid, ip, key_ra, exemplar or ctx)
        try:
            site = self.resolver.site(pid, ip, ra)
            stack = self.resolver.stack_for(pid, site, exemplar or ctx, self.options.stack_depth)
        except (OSError, ValueError, AccessDenied):
            return Frame(ra), Stack((Frame(ip), Frame(ra)), True, "bpf")
        info = (site.caller, stack)
        (self._site_info if exemplar is not None else self._shallow_info)[key] = info
        return info

    def _kernel_state(self, dump: RawDump, complete: int | None) -> KernelState:
        mappings = tuple(
            KernelMapping(pid, addr, length, ip, ra, self._wall(ts), flags, _s32(fd), path)
            for pid, addr, length, ip, ra, path, ts, flags, fd in dump.live
        )
        sites = dict(dump.sites)
        callers, self._batch_callers = self._batch_callers, {}
        for key in {m.site for m in mappings} | set(sites):
            callers[key] = self.describe(*key)
        lifecycle, self._lifecycle = tuple(self._lifecycle), []
        return KernelState(
            self._wall(dump.ts),
            mappings,
            sites,
            dump.syscalls,
            callers,
            lifecycle,
            None if complete is None else self._wall(complete),
        )

    def _check_patched(self) -> None:
        """Say when the target's libc is hooked in memory (libucm): the user should know, and we
        place no uprobes anyway (one on patched code kills the target with SIGILL)."""
        try:
            note = patched_note(find_patched(self.target.pid, self.resolver))
        except (OSError, ValueError):
            note = None
        if note:
            self.note_once(note)

    def note_once(self, text: str) -> None:
        if text not in self.stats.notes:
            self.stats.notes.append(text)


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def _shm_length(pid: int, addr: int, shmid: int) -> int:
    """Size of a System V segment just attached: its mapping in the target, else /proc/sysvipc."""
    try:
        for line in (PROC / str(pid) / "maps").read_text().splitlines():
            lo, _, rest = line.partition("-")
            if int(lo, 16) == addr:
                return int(rest.split()[0], 16) - addr
    except (OSError, ValueError):
        pass
    # /proc/sysvipc lists our IPC namespace's segments: a container's shmid means nothing there.
    return shm_segment_size(pid, shmid)
