"""What an investigation found, as typed results: each evaluation, the gdb pass, the progress
shown while it runs, and the result. Renderers (leakhunt.render) and --json read these, never the
live loop."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from leakhunt.analysis.correlate import Attribution
from leakhunt.analysis.device import device_finding, device_json, device_leak_only
from leakhunt.analysis.processes import ProcessReport
from leakhunt.analysis.summary import MemorySummary
from leakhunt.proc.sampler import History
from leakhunt.proc.target import Target
from leakhunt.text import short_command
from leakhunt.trace.backend import TraceStats
from leakhunt.trace.session import BackendChoice

#: What a no-leak verdict cannot rule out, said with it.
BLIND_SPOT = (
    "memory is judged as the process maps it: a leak inside memory allocated up front (the blocks "
    "of a preallocated KV cache, an object pool) grows nothing here; the application's own pool "
    "metrics show it"
)


@dataclass(frozen=True)
class Evaluation:
    t: float
    summary: MemorySummary
    attribution: Attribution

    @property
    def top(self) -> str | None:
        return self.attribution.culprits[0].title if self.attribution.culprits else None

    def to_record(self) -> dict:
        v = self.summary.verdict
        return {
            "t": self.t,
            "leak": v.leak,
            "rss_slope_bytes_per_s": self.summary.rss.verdict.trend.slope,
            "footprint_slope_bytes_per_s": v.trend.slope,
            "slope_interval": v.trend.interval,
            "explained_fraction": self.attribution.explained_fraction,
            "attribution": self.attribution.to_json(),
        }


@dataclass(frozen=True)
class GdbPass:
    """The short gdb session that deepens the top culprit's shallow BPF stack."""

    culprit: str
    stacks: int  # full stacks caught of the culprit's calls
    stack: tuple[str, ...]  # the deepest of them, frame by frame ("" when none)
    stack_partial: bool
    hits: int | None  # breakpoint hits, and what they cost the target (gdb's own figures)
    cost: dict | None
    end: str | None  # why the pass ended

    def to_json(self) -> dict:
        return {**asdict(self), "stack": list(self.stack)}


@dataclass(frozen=True)
class Progress:
    """What the live view shows while an investigation runs."""

    target: str  # described for people
    elapsed_s: float
    duration_s: float
    samples: int
    processes: int  # live processes
    subprocesses: bool  # the tree under the target is followed
    tracer: str  # the backend's name, or why there is none
    events: int
    last: Evaluation | None


@dataclass
class InvestigationResult:
    target: Target
    choice: BackendChoice | None
    no_tracer: str | None  # why there was no tracer, if there was none
    history: History
    summary: MemorySummary
    attribution: Attribution
    evaluations: list[Evaluation]
    stopped_because: str
    error: Exception | None = None  # the target was lost mid-run
    stats: TraceStats | None = None  # the tracer's, when there was one
    gdb: GdbPass | None = None  # the deep-stack pass: what it found and cost
    notes: list[str] = field(default_factory=list)
    subprocesses: bool = False  # the tree under the target was followed
    processes: list[ProcessReport] = field(default_factory=list)  # one per process sampled
    tree: dict = field(default_factory=dict)  # how the totals count, PSS and USS (processes.tree_document)
    device_unavailable: str | None = None  # why device memory (NVML) was not sampled

    @property
    def leak(self) -> bool:
        """Host RSS leaks, or device memory does while RSS is flat (the leak smaps cannot see)."""
        return self.summary.leak or device_leak_only(self.summary)

    def verdict(self) -> str:
        v = self.summary.verdict
        if device_leak_only(self.summary):
            return device_finding(self.summary)
        if not v.leak:
            return f"no leak: {v.reason}"
        top = self.attribution.culprits[0] if self.attribution.culprits else None
        if self.subprocesses and top is not None and top.pid is not None:
            return f"{self.where(top.pid)}: {self.attribution.sentence()}"
        return self.attribution.sentence()

    def where(self, pid: int) -> str:
        """'pid 124 (python -m engine), a child of pid 123': a process of the tree, for people."""
        doc = next((p for p in self.processes if p.pid == pid), None)
        text = f"pid {pid}" + (f" ({short_command(doc.cmdline)[:60]})" if doc and doc.cmdline else "")
        if pid != self.target.pid:
            parent = doc.ppid if doc else None
            text += (
                f", a child of pid {self.target.pid}"
                if parent == self.target.pid
                else f", under pid {self.target.pid}"
            )
        return text

    def to_json(self) -> dict:
        v = self.summary.verdict
        stats = self.stats
        return {
            "command": "investigate",
            "pid": self.target.pid,
            "nspid": list(self.target.nspid),
            "cmdline": self.target.cmdline,
            "leak": self.leak,
            "verdict": self.verdict(),
            "rss_verdict": self.summary.rss.verdict.reason,
            "rss_slope_bytes_per_s": self.summary.rss.verdict.trend.slope,
            "slope_interval": self.summary.rss.verdict.trend.interval,
            "footprint_verdict": v.reason,
            "footprint_bytes_start": self.summary.main.start,
            "footprint_bytes_end": self.summary.main.end,
            "footprint_slope_bytes_per_s": v.trend.slope,
            "footprint_slope_interval": v.trend.interval,
            "held_shm": self.summary.held_json(),
            "cgroup": self.summary.cgroup_json(),
            "dev_shm": self.summary.dev_shm_json(),
            "explained_fraction": self.attribution.explained_fraction,
            "unexplained_bytes": self.attribution.unexplained,
            "culprits": [c.to_json() for c in self.attribution.culprits] if v.leak else [],
            "growing_not_leaking": [c.to_json() for c in self.attribution.culprits] if not v.leak else [],
            "blind_spot": None if v.leak else BLIND_SPOT,
            "attribution": self.attribution.to_json(),
            "duration_s": self.summary.duration_s,
            "samples": self.summary.samples,
            "stopped_because": self.stopped_because,
            "backend": self.choice.name if self.choice else None,
            "backends_unavailable": self.choice.unavailable if self.choice else {},
            "no_tracer": self.no_tracer,
            "events": stats.events if stats else 0,
            "lost_events": stats.lost_events if stats else 0,
            "gdb": self.gdb.to_json() if self.gdb else None,
            "memory": self.summary.to_json(),
            "device_memory": device_json(self.summary, self.device_unavailable),
            "notes": self.notes + (list(stats.notes) if stats else []),
            "subprocesses": self.subprocesses,
            "processes": [p.to_json() for p in self.processes],
            "tree": self.tree,
        }
