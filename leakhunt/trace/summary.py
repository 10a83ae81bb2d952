"""What a trace-mmap run saw, as typed results: the live view and the final summary render them,
--json and --record write their ``to_json()``. Built from a TraceSession (and the page-fault
source, with --faults) at one moment; nothing here reads the session later.
"""

from __future__ import annotations

from dataclasses import dataclass

from leakhunt.trace.faults import FaultTracer, MappedBy, by_toucher
from leakhunt.trace.faults_bpftrace import BpftraceFaultTracer
from leakhunt.trace.session import BackendChoice, CallerView, TraceSession

#: Callers and touchers listed in the fault table and its JSON.
TOP = 15


@dataclass(frozen=True)
class Toucher:
    """Pages one caller faulted in (and still holds, when the source nets give-backs)."""

    library: str
    symbol: str
    allocators: tuple[str, ...]
    pages: int
    stack: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.library}!{self.symbol}"

    def to_json(self) -> dict:
        return {
            "library": self.library,
            "symbol": self.symbol,
            "allocators": list(self.allocators),
            "pages": self.pages,
            "bytes": self.pages * 4096,
            "stack": list(self.stack),
        }


@dataclass(frozen=True)
class FaultSummary:
    seen: int  # faults seen
    sampled: bool  # sampled and scaled
    given_back_pages: int | None  # None: the source counts faults without netting (bpftrace)
    by_caller: tuple[Toucher, ...]

    def to_json(self) -> dict:
        return {
            "seen": self.seen,
            "sampled": self.sampled,
            "given_back_pages": self.given_back_pages,
            "by_caller": [t.to_json() for t in self.by_caller],
        }


@dataclass(frozen=True)
class TraceSummary:
    target: str  # described for people
    pid: int
    nspid: tuple[int, ...]
    cmdline: str
    backend: str
    backends_unavailable: dict[str, str]
    duration_s: float
    stopped_because: str
    events: int
    events_by_kind: dict
    streamed: int  # events that reached user space
    lost: int
    backlog: int  # calls a reader that fell behind never applied
    covered_s: float | None  # how much of the run the figures cover (None: all of it)
    filtered: int  # below --min-size
    untracked_in_kernel: int  # unmaps of untracked memory, decided in the kernel
    untracked_unmaps: int  # all unmaps of memory mapped before the trace or of holes
    callers: tuple[CallerView, ...]
    notes: tuple[str, ...]
    backend_details: dict
    record: str | None
    faults: FaultSummary | None

    @property
    def outstanding_bytes(self) -> int:
        return sum(c.totals.outstanding_bytes for c in self.callers)

    @property
    def outstanding_mappings(self) -> int:
        return sum(c.totals.mappings for c in self.callers)

    def to_json(self) -> dict:
        doc = {
            "command": "trace-mmap",
            "pid": self.pid,
            "nspid": list(self.nspid),
            "cmdline": self.cmdline,
            "backend": self.backend,
            "backends_unavailable": self.backends_unavailable,
            "duration_s": round(self.duration_s, 3),
            "stopped_because": self.stopped_because,
            "events": self.events,
            "events_by_kind": self.events_by_kind,
            "streamed_events": self.streamed,
            "lost_events": self.lost,
            "backlog_events": self.backlog,
            "covered_s": self.covered_s,
            "filtered_events": self.filtered,
            "untracked_unmaps": self.untracked_unmaps,
            "outstanding_bytes": self.outstanding_bytes,
            "outstanding_mappings": self.outstanding_mappings,
            "by_caller": [c.to_json() for c in self.callers],
            "notes": list(self.notes),
            "backend_details": self.backend_details,
            "record": self.record,
        }
        if self.faults is not None:
            doc["faults"] = self.faults.to_json()
        return doc


def summarize_trace(
    session: TraceSession,
    choice: BackendChoice,
    record: str | None = None,
    faults: FaultTracer | BpftraceFaultTracer | None = None,
) -> TraceSummary:
    stats = session.backend.stats
    covered = None if stats.complete_until is None else stats.complete_until - session.started_wall
    return TraceSummary(
        target=session.target.describe(),
        pid=session.target.pid,
        nspid=tuple(session.target.nspid),
        cmdline=session.target.cmdline,
        backend=choice.name,
        backends_unavailable=dict(choice.unavailable),
        duration_s=session.elapsed,
        stopped_because=session.stopped_because,
        events=stats.events,
        events_by_kind=dict(session.ledger.kernel_syscalls),
        streamed=session.streamed,
        lost=stats.lost_events,
        backlog=stats.backlog,
        covered_s=None if covered is None else round(max(0.0, covered), 3),
        filtered=stats.filtered,
        untracked_in_kernel=stats.untracked,
        untracked_unmaps=session.ledger.unmatched_unmaps + stats.untracked,
        callers=tuple(session.callers()),
        notes=tuple(stats.notes),
        backend_details=session.backend.details(),
        record=record,
        faults=_faults(faults, session) if faults is not None else None,
    )


def _faults(tracer: FaultTracer | BpftraceFaultTracer, session: TraceSession) -> FaultSummary:
    view = tracer.view()
    rows = by_toucher(view, mapped_by(session))[:TOP]
    return FaultSummary(
        seen=view.seen,
        sampled=view.sampled,
        given_back_pages=view.given_back if view.netted else None,
        by_caller=tuple(
            Toucher(
                library=label[0],
                symbol=label[1],
                allocators=tuple(sorted(allocators)),
                pages=round(pages),
                stack=tuple(str(f) for f in toucher.stack.frames),
            )
            for label, pages, allocators, toucher in rows
        ),
    )


def mapped_by(session: TraceSession) -> MappedBy:
    """The traced mappings still held, for naming the allocator that mapped faulted pages."""
    info = session.ledger.site_info
    return MappedBy(
        (o.pid, o.start, o.end, info.get(o.site, (None, None))[1]) for o in session.ledger.outstanding()
    )
