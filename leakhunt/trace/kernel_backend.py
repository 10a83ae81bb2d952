"""What the bpftrace and BCC backends share: both keep the ledger's common case in the kernel and
send the rest as raw records; this turns records into ordered MmapEvents with named callers.

A backend subclass only launches its program, reads raw records and reads the kernel's maps.
Order matters (an unmap applied before its map would leave a false leak) and per-CPU buffers do
not keep it, so streamed records are held back until a kernel snapshot newer than them exists,
then released sorted by time, together with that snapshot.

TraceOptions.extra keys both read: ``stream_all`` (every call to user space: --all-events) and
``max_mappings`` (mappings the kernel holds); bcc also ``ring_pages``, bpftrace ``perf_pages``.
"""

from __future__ import annotations

import os
import time
from abc import abstractmethod
from typing import NamedTuple

from leakhunt.errors import AccessDenied
from leakhunt.gdb.memory import shm_segment_size
from leakhunt.proc.target import PROC
from leakhunt.trace.backend import Backend, TraceOptions
from leakhunt.trace.events import SYSCALL_KINDS, EventKind, Frame, MmapEvent, Stack
from leakhunt.trace.ledger import KernelMapping, KernelState, Lifecycle, SiteCounts, SiteKey
from leakhunt.trace.patched import find_patched, patched_note
from leakhunt.trace.unwind import CallerResolver, UserContext

#: A fork/exec/exit record as the kernel sends it (kernel monotonic ns until converted).
RawLifecycle = Lifecycle

#: The inode of the kernel's initial pid namespace (PROC_PID_INIT_INO), the one BPF's pids live in.
INIT_PID_NS_INO = 0xEFFFFFFC

#: Streamed records are released once a snapshot is this much newer than them: per-CPU buffers
#: are read within microseconds, this leaves room for a reader descheduled on a busy machine.
HOLDBACK_NS = 50_000_000


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
        self._pending: list[RawCall] = []
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

    # -- what subclasses provide ---------------------------------------------------------------

    @abstractmethod
    def _read(self, timeout: float) -> tuple[list, RawDump | None]:
        """Raw records that arrived (RawCall, RawExemplar, RawLifecycle) and the newest complete
        dump of the kernel maps, if one was taken; waits up to ``timeout`` for a dump."""

    @abstractmethod
    def _shutdown(self) -> tuple[list, RawDump | None]:
        """Detach; the records that arrived meanwhile and a final dump (None if none came)."""

    @abstractmethod
    def _lost(self) -> int:
        """Records the kernel or the transport dropped so far, counted exactly."""

    # -- Backend -------------------------------------------------------------------------------

    def poll(self, timeout: float) -> list[MmapEvent]:
        if self._stopped:
            # After stop(): what arrived while detaching, all of it, with the final state.
            dump, self._final_dump = self._final_dump, None
            return self._release(None, dump)
        records, dump = self._read(timeout)
        self._absorb(records)
        if dump is None:
            return []
        return self._release(dump.ts - HOLDBACK_NS, dump)

    def stop(self) -> None:
        if self._stopped or not self._started:
            return
        self._stopped = True
        records, self._final_dump = self._shutdown()
        self._absorb(records)

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
        }

    @property
    def target_exited(self) -> bool:
        return self._exited or not self.target.alive()

    def _absorb(self, records: list) -> None:
        for r in records:
            if isinstance(r, RawCall):
                self._pending.append(r)
                self._check_ip(r.pid, r.ip)
            elif isinstance(r, RawExemplar):
                key = (r.pid, r.ip, r.ra, r.path)
                if key not in self._exemplars:
                    self._exemplars[key] = UserContext(r.ip, r.sp, r.bp, r.stack)
                    self._on_exemplar(r.pid, self._exemplars[key])
                self._check_ip(r.pid, r.ip)
            elif isinstance(r, RawLifecycle):
                self._on_lifecycle(r)
        self.stats.lost_events = self._lost()

    def _release(self, cutoff: int | None, dump: RawDump | None) -> list[MmapEvent]:
        """Events older than ``cutoff`` (all with None), in time order; then the kernel state."""
        if cutoff is None:
            ready, self._pending = self._pending, []
        else:
            ready = [r for r in self._pending if r.ts < cutoff]
            self._pending = [r for r in self._pending if r.ts >= cutoff]
        ready.sort(key=lambda r: r.ts)
        events = [ev for ev in (self._event(r) for r in ready) if ev is not None]
        if dump is not None:
            self._last_dump = dump
            self._state = self._kernel_state(dump)
            self.stats.events = sum(dump.syscalls.values())
            self.stats.filtered = dump.filtered
            self.stats.untracked = dump.untracked
        self.stats.lost_events = self._lost()
        return events

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

    def _event(self, r: RawCall) -> MmapEvent | None:
        kind = SYSCALL_KINDS.get(r.nr)
        if kind is None or kind not in self.options.kinds:
            return None
        a0, a1, a2, a3, a4 = r.args
        caller, stack = self.describe(r.pid, r.ip, r.ra, r.path, UserContext(r.ip, r.sp, 0, r.words))
        common = dict(
            ts=self._wall(r.ts) / 1e9,
            pid=r.pid,
            tid=r.tid,
            kind=kind,
            ret=r.ret,
            stack=stack if self.options.stacks else Stack(stack.frames[:2], True, stack.source),
            caller=caller,
            path=r.path,
        )
        if kind is EventKind.MMAP:
            return MmapEvent(addr=a0, length=a1, prot=a2, flags=a3, fd=_s32(a4), **common)
        if kind is EventKind.MUNMAP:
            return MmapEvent(addr=a0, length=a1, **common)
        if kind is EventKind.MREMAP:
            return MmapEvent(addr=a0, length=a1, new_length=a2, flags=a3, **common)
        if kind is EventKind.BRK:
            return MmapEvent(addr=a0, **common)
        if kind is EventKind.SHMAT:
            return MmapEvent(fd=a0, addr=a1, flags=a2, length=_shm_length(r.pid, r.ret, a0), **common)
        if kind is EventKind.SHMDT:
            return MmapEvent(addr=a0, **common)
        return MmapEvent(flags=a1, **common)  # memfd_create: ret is the new fd

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

    def _kernel_state(self, dump: RawDump) -> KernelState:
        mappings = tuple(
            KernelMapping(pid, addr, length, ip, ra, self._wall(ts), flags, _s32(fd), path)
            for pid, addr, length, ip, ra, path, ts, flags, fd in dump.live
        )
        sites = dict(dump.sites)
        callers = {}
        for key in {m.site for m in mappings} | set(sites):
            callers[key] = self.describe(*key)
        lifecycle, self._lifecycle = tuple(self._lifecycle), []
        return KernelState(self._wall(dump.ts), mappings, sites, dump.syscalls, callers, lifecycle)

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
