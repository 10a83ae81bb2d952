"""What every tracer backend is: start on a target, hand over MmapEvents as they come, stop,
and count what it lost. `trace-mmap`, `investigate` and the tests drive backends only through
this interface; the registry below is the one list of backends and where they live."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from leakhunt.errors import BackendUnavailable
from leakhunt.proc.target import Target
from leakhunt.trace.events import EventKind, MmapEvent

if TYPE_CHECKING:
    from leakhunt.trace.ledger import KernelState

#: name -> "module:Class"; the order is the preference of `--backend auto`.
BACKENDS: dict[str, str] = {
    "bcc": "leakhunt.trace.bcc:BccBackend",
    "bpftrace": "leakhunt.trace.bpftrace:BpftraceBackend",
    "gdb": "leakhunt.gdb.backend:GdbBackend",
}


@dataclass(frozen=True)
class TraceOptions:
    kinds: frozenset[EventKind] = frozenset(EventKind)
    follow: bool = False  # also trace children forked after the start
    existing: tuple[int, ...] = ()  # with follow: processes already under the target (Backend.takes_existing)
    min_length: int = 0  # ignore mmap/munmap smaller than this
    stacks: bool = True  # collect user stacks (costs more)
    stack_depth: int = 16
    # Backend-specific knobs (gdb: hit budget, sampling, gdb path...) without widening this class.
    extra: dict = field(default_factory=dict)


@dataclass
class TraceStats:
    events: int = 0  # events delivered
    lost_events: int = 0  # events the kernel or the backend dropped, counted exactly
    filtered: int = 0  # events seen but not delivered on purpose (min_length...)
    untracked: int = 0  # unmaps the kernel side found touching nothing traced (holes, older memory)
    backlog: int = 0  # calls read from the kernel but not applied yet (a reader behind says so)
    complete_until: float | None = None  # wall time up to which every call was applied (None: all)
    notes: list[str] = field(default_factory=list)  # what a person should know (patched code...)


class Backend(ABC):
    name: str = "?"
    #: What a person should know before choosing it where it works (doctor shows it).
    caveat: str = ""
    #: Traces options.existing (with follow) from its start: a set of pids fixed when it starts.
    takes_existing: bool = False

    def __init__(self, target: Target, options: TraceOptions) -> None:
        self.target = target
        self.options = options
        self.stats = TraceStats()

    @classmethod
    @abstractmethod
    def unavailable_reason(cls) -> str | None:
        """None when the backend can run on this machine, else one line saying why not."""

    @abstractmethod
    def start(self) -> None:
        """Attach. Raises BackendUnavailable, TargetGone or AccessDenied."""

    @abstractmethod
    def poll(self, timeout: float) -> list[MmapEvent] | np.ndarray:
        """Events since the last call, waiting up to ``timeout`` seconds for the first one: a
        list, or (the BPF backends) a batch of ledger CALLS rows that to_events() turns into one."""

    @abstractmethod
    def stop(self) -> None:
        """Detach and release everything; idempotent; never leaves the target stopped."""

    @property
    def target_exited(self) -> bool:
        return not self.target.alive()

    @property
    def finished(self) -> str | None:
        """Why the backend stopped tracing on its own (gdb: a hit or time budget ran out), else None."""
        return None

    def kernel_state(self) -> KernelState | None:
        """The part of the ledger the backend keeps in the kernel (mappings made and, maybe,
        unmapped there without any event reaching user space), as of the last poll() and newer
        than every event it returned; None for backends that stream every event (gdb)."""
        return None

    def add_pid(self, pid: int) -> bool:
        """Trace one more process while running (with options.follow); False when this backend's
        set of processes is fixed once it started."""
        return False

    def to_events(self, batch: np.ndarray) -> list[MmapEvent]:
        """A batch poll() returned, as MmapEvents (for recordings)."""
        raise NotImplementedError(f"the {self.name} backend returns MmapEvents")

    @property
    def backlog(self) -> int:
        """Calls read and not handed over yet (a backend that falls behind says so here)."""
        return 0

    def details(self) -> dict:
        """Backend-specific facts for a command's JSON document (gdb: what the session cost the
        target, how it ended); empty by default."""
        return {}

    def __enter__(self) -> Backend:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def backend_class(name: str) -> type[Backend]:
    try:
        module, cls = BACKENDS[name].split(":")
    except KeyError:
        raise BackendUnavailable(name, f"no such backend (choose from {', '.join(BACKENDS)})", "") from None
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise BackendUnavailable(name, f"not built into this leakhunt ({e})", "") from None
