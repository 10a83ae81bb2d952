"""The gdb tracer backend: slow, but full symbolized stacks (Python frames too) for every mmap.

A GdbSession runs in a thread of its own so that a stopped target thread is answered at once,
whatever the caller does between polls; events reach poll() through a queue. The knobs that only
gdb has (hit and time budgets, sampling, the gdb binary: cuda-gdb works) travel in
TraceOptions.extra under the GDB_* keys below; `gdb_extra()` builds them.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading

from leakhunt.gdb.budget import Budget
from leakhunt.gdb.preflight import ptrace_scope
from leakhunt.gdb.session import GdbConfig, GdbSession, run_in_thread
from leakhunt.proc.target import Target
from leakhunt.trace.backend import Backend, TraceOptions
from leakhunt.trace.events import MmapEvent

GDB_PATH = "gdb_path"  # str: gdb, cuda-gdb, /opt/gdb/bin/gdb
GDB_ENV = "LEAKHUNT_GDB"  # the gdb to drive when GDB_PATH is not given (default: gdb)
GDB_MAX_HITS = "gdb_max_hits"  # int: detach after this many handled hits
GDB_TIME_BUDGET = "gdb_time_budget"  # float seconds: detach after this long
GDB_EVERY = "gdb_every"  # int: stacks of 1 mmap in N (releases are never sampled)
GDB_PYTHON_FRAMES = "gdb_python_frames"  # bool: read Python frames when the target runs CPython
GDB_UNMAP_STACKS = "gdb_unmap_stacks"  # bool: full stacks for munmap too
GDB_DEPTH = "gdb_depth"  # int: frames per stack at most

#: Default hit budget: a session nobody bounded still ends (at about 1 ms per hit, ~1 s stopped).
DEFAULT_MAX_HITS = 1000
JOIN_TIMEOUT_S = 60.0


def gdb_extra(
    gdb_path: str | None = None,
    max_hits: int | None = None,
    time_budget: float | None = None,
    every: int | None = None,
    python_frames: bool | None = None,
    unmap_stacks: bool | None = None,
    depth: int | None = None,
) -> dict:
    """TraceOptions.extra entries for the gdb backend (None: the default)."""
    given = {
        GDB_PATH: gdb_path,
        GDB_MAX_HITS: max_hits,
        GDB_TIME_BUDGET: time_budget,
        GDB_EVERY: every,
        GDB_PYTHON_FRAMES: python_frames,
        GDB_UNMAP_STACKS: unmap_stacks,
        GDB_DEPTH: depth,
    }
    return {k: v for k, v in given.items() if v is not None}


def config_from_options(options: TraceOptions) -> GdbConfig:
    extra = options.extra
    budget = Budget(
        max_hits=extra.get(GDB_MAX_HITS, DEFAULT_MAX_HITS),
        max_seconds=extra.get(GDB_TIME_BUDGET),
        every_nth=extra.get(GDB_EVERY, 1),
    )
    return GdbConfig(
        gdb_path=extra.get(GDB_PATH) or default_gdb(),
        kinds=frozenset(options.kinds),
        min_length=options.min_length,
        budget=budget,
        stacks=options.stacks,
        depth=extra.get(GDB_DEPTH, 128),
        unmap_stacks=extra.get(GDB_UNMAP_STACKS, False),
        python_frames=extra.get(GDB_PYTHON_FRAMES, True),
    )


def default_gdb() -> str:
    return os.environ.get(GDB_ENV) or "gdb"


class GdbBackend(Backend):
    name = "gdb"

    def __init__(self, target: Target, options: TraceOptions) -> None:
        super().__init__(target, options)
        self.config = config_from_options(options)  # ValueError on a bad budget: before any attach
        self._events: queue.SimpleQueue[MmapEvent] = queue.SimpleQueue()
        self._session: GdbSession | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        gdb = default_gdb()
        if shutil.which(gdb) is None:
            return (
                f"{gdb} not found (apt-get install gdb, or --gdb-path / ${GDB_ENV} for another gdb)"
                if gdb != "gdb"
                else "gdb is not installed (apt-get install gdb, or --gdb-path for another gdb)"
            )
        if ptrace_scope() == 3:
            return "ptrace is disabled (kernel.yama.ptrace_scope=3)"
        return None

    def start(self) -> None:
        if self.options.follow:
            self.stats.notes.append("gdb traces the given process only, not its children")
        self._session = GdbSession(self.target, self.config, self._events.put)
        self._session.start()
        self._thread = run_in_thread(self._session)

    def poll(self, timeout: float) -> list[MmapEvent]:
        events: list[MmapEvent] = []
        wait = timeout if self._running() else 0
        try:
            events.append(self._events.get(timeout=wait) if wait > 0 else self._events.get_nowait())
            while True:
                events.append(self._events.get_nowait())
        except queue.Empty:
            pass
        self.stats.events += len(events)
        self._update_stats()
        return events

    def stop(self) -> None:
        if self._session is None:
            return
        self._session.request_stop("stopped by leakhunt")
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
        self._update_stats()
        summary = self._session.cost.summary()
        if summary not in self.stats.notes:
            self.stats.notes.append(f"gdb: {summary}")

    @property
    def finished(self) -> str | None:
        """Why the session ended on its own (budget, target exit, gdb death), None while it runs."""
        if self._session is None or self._running():
            return None
        return self._session.end.reason or "ended"

    @property
    def target_exited(self) -> bool:
        return (self._session is not None and self._session.end.target_exited) or super().target_exited

    def details(self) -> dict:
        """What this session cost and how it ended, for the command's JSON document."""
        s = self._session
        if s is None:
            return {}
        state = s.state()
        return {
            "end": s.end.reason,
            "detached": s.end.detached,
            "target_exited": s.end.target_exited,
            "restored_sites": s.end.restored,
            "tracer_after": s.end.tracer_left,
            "hits": state.hits,
            "lost": state.lost,
            "seen": state.seen,
            "breakpoints": [site.describe() for site in s.sites.values()],
            "python_frames": s.python_frames,
            "cost": s.cost.to_json(),
            "gdb": self.config.gdb_path,
            "sysroot": s.sysroot,
            "unread_libraries": s.unread_libraries,
        }

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _update_stats(self) -> None:
        state = self._session.state()
        self.stats.lost_events = state.lost
        self.stats.filtered = max(0, state.seen - state.hits - state.lost)
        for note in state.notes:
            if note not in self.stats.notes:
                self.stats.notes.append(note)
