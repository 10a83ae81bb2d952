"""`investigate`: the sampler and the best tracer together, the correlator over both, and gdb for
a full stack of the top caller when the BPF stack is shallow. Stops as soon as the verdict is
confident, or at the duration. With ``subprocesses`` the target is the whole tree under the pid:
every process attributed on its own, the tree judged with shared memory counted once. What is
sampled and how it is attributed is memory.py's; one process is a tree of one, and the loop is the
same for both.

The loop is single-threaded: between two smaps samples it polls the tracer, so events flow into
the ledger while the sampler keeps its pace. Tracing starts before the first sample, so every
mapping made inside the window is known; growth inside mappings made before it is reported as
unexplained rather than guessed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from leakhunt.analysis.correlate import Attribution
from leakhunt.analysis.device import open_nvml
from leakhunt.analysis.summary import MemorySummary, summarize
from leakhunt.analysis.verdict import MIN_SLOPE
from leakhunt.errors import AccessDenied, BackendUnavailable, LeakhuntError, TargetGone
from leakhunt.investigate.memory import TargetMemory
from leakhunt.investigate.results import Evaluation, GdbPass, InvestigationResult, Progress
from leakhunt.proc.sampler import STOP_DURATION, STOP_INTERRUPTED, Pace
from leakhunt.proc.target import Target, open_target
from leakhunt.proc.tree import descendants
from leakhunt.record import SessionWriter
from leakhunt.trace.backend import TraceOptions, backend_class
from leakhunt.trace.creators import CreatorTracer
from leakhunt.trace.events import EventKind, Frame, Stack
from leakhunt.trace.faults import FaultTracer, allocator_of
from leakhunt.trace.faults_bpftrace import BpftraceFaultTracer, fault_source
from leakhunt.trace.session import BackendChoice, choose_backend
from leakhunt.trace.tree_trace import TreeTrace

STOP_CONFIDENT = "verdict confident"
VERDICT = "verdict"
STACKS = "stacks"
#: Never decide before this much evidence, whatever the numbers say.
MIN_DECIDE_S = 15.0
#: A confident verdict: a leak, this much of it explained, by the same culprit this many times running.
CONFIDENT_EXPLAINED = 0.9
CONFIDENT_REPEATS = 3
EVALUATE_EVERY_S = 2.0
#: Below this share of the growth explained by mmaps, the page-fault source is started.
FAULTS_BELOW = 0.8
#: The longest the tracer's turn between samples runs at once.
POLL_S = 0.25
#: The gdb pass that deepens a shallow stack: its budget, so the target is stopped only briefly.
GDB_HITS = 25
GDB_SECONDS = 10.0
GDB_MIN_SECONDS = 2.0
#: A stack of at most this many frames (wrapper, caller, maybe one more) is shallow.
SHALLOW_FRAMES = 3


@dataclass(frozen=True)
class InvestigateOptions:
    duration: float = 60.0
    interval: float = 1.0
    warmup: float | None = None
    backend: str = "auto"
    gdb_stacks: bool = True
    min_decide_s: float = MIN_DECIDE_S
    subprocesses: bool = False  # the whole tree under the pid, children that come later too
    creators: bool = True  # trace who creates shared objects on the host (BCC), for shm culprits
    faults: bool = True  # count the target's page faults (BCC): growth no mmap explains, by first touch


class Investigation:
    """One run of investigate over one target."""

    def __init__(
        self,
        target: Target,
        options: InvestigateOptions,
        writer: SessionWriter | None = None,
        on_update: Callable[[Investigation, Evaluation | None], None] | None = None,
    ) -> None:
        self.target = target
        self.options = options
        self.writer = writer
        self.on_update = on_update
        self.evaluations: list[Evaluation] = []
        self.tracer: TreeTrace | None = None
        self.creators: CreatorTracer | None = None
        self.faults: FaultTracer | BpftraceFaultTracer | None = None
        self._loaders: list[threading.Thread] = []
        self._extras_possible = False
        self._stopping = threading.Event()
        self.choice: BackendChoice | None = None
        self.no_tracer: str | None = None
        self.notes: list[str] = []
        self._gpu, self.device_unavailable = open_nvml()
        self.memory = TargetMemory(target, options.interval, self._gpu, writer, follow=options.subprocesses)
        self.history = self.memory.history
        self.started = 0.0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started if self.started else 0.0

    def _start_tracer(self) -> None:
        try:
            self.choice = choose_backend(self.options.backend)
        except BackendUnavailable as e:
            if self.options.backend != "auto":
                raise
            self.no_tracer = e.reason
            return
        if self.choice.name == "gdb" and self.options.backend == "auto":
            # gdb stops the target at every mmap: fine for a deep look, wrong as the always-on tracer.
            self.no_tracer = (
                "no BPF backend works here ("
                + "; ".join(f"{n}: {r}" for n, r in self.choice.unavailable.items())
                + ")"
            )
            self.choice = None
            return
        follow = self.options.subprocesses
        if self.choice.name == "gdb" and follow:
            follow = False  # one gdb per process would stop every process of the tree at each mmap
            self.notes.append("the gdb backend traces the root process only, not its children")
        # bpftrace fixes its set of pids at the start: the processes under the root now go in it.
        options = TraceOptions(follow=follow, existing=descendants(self.target.pid) if follow else ())
        self.tracer = TreeTrace(self.target, self.choice, options, self.writer)
        # Started before the children are listed: one forked in between is followed by the backend.
        self.tracer.start()
        # The creators and page-fault sources are started by the evaluations that need them
        # (shared memory held, growth the mmaps do not explain or an allocator mapped): most
        # investigations never pay for them.
        self._extras_possible = self.choice.name != "gdb"
        for child in self.memory.existing():
            self.tracer.adopt(child, existed=True)

    def _want_extras(self, summary: MemorySummary, attribution: Attribution) -> None:
        """Start, in the background, the evidence this evaluation says is missing."""
        if not self._extras_possible or self._stopping.is_set():
            return
        wanted = []
        held_grows = summary.held is not None and summary.held.growth > 0
        if (
            self.options.creators
            and self.creators is None
            and (held_grows or any(c.segments for c in attribution.culprits))
        ):
            self.creators = CreatorTracer()
            wanted.append("creators")
        top = attribution.culprits[0] if attribution.culprits else None
        through_allocator = top is not None and top.evidence.startswith("traced") and _allocator_culprit(top)
        unexplained = summary.main.growth > 0 and attribution.explained_fraction < FAULTS_BELOW
        if self.options.faults and self.faults is None and (unexplained or through_allocator):
            self.faults = fault_source(self.memory.pids(), self.choice.name if self.choice else "auto")
            wanted.append("faults")
        if wanted:
            loader = threading.Thread(
                target=self._load_extras, args=(wanted,), name="bpf-extras", daemon=True
            )
            self._loaders.append(loader)
            loader.start()

    def _load_extras(self, wanted: list[str]) -> None:
        for name, tracer, what in (
            ("creators", self.creators, "who creates shared objects is not traced"),
            ("faults", self.faults, "page faults are not counted"),
        ):
            if name not in wanted or tracer is None or self._stopping.is_set():
                continue
            try:
                tracer.start()
            except BackendUnavailable as e:
                self.notes.append(f"{what}: {e.reason}")
                setattr(self, name, None)
            except Exception as e:  # noqa: BLE001 - extra evidence must never end an investigation
                self.notes.append(f"{what}: {type(e).__name__}: {e}")
                setattr(self, name, None)

    def _stop_extras(self) -> None:
        self._stopping.set()
        for loader in self._loaders:
            loader.join(60)  # a compile in progress: it finishes, then stops at once
        for tracer in (self.creators, self.faults):
            if tracer is not None:
                tracer.stop()

    def _sample(self) -> None:
        born, notes = self.memory.take()
        for child in born:
            if self.tracer:
                self.tracer.adopt(child)
            if self.faults:
                self.faults.add_pid(child.pid)
        self.notes += notes

    def evaluate(self) -> Evaluation:
        # The verdict's floor is the noise of one serving process: a tree has that much per process.
        floor = MIN_SLOPE * self.memory.processes
        summary = summarize(self.history, warmup_s=self.options.warmup, min_slope=floor, pid=self.target.pid)
        faults = self.faults.view() if self.faults else None
        attribution = self.memory.attribute(summary, self.options.warmup, self.tracer, faults)
        if self.creators is not None:
            attribution = with_creators(attribution, self.creators)
        self._want_extras(summary, attribution)
        ev = Evaluation(t=self.history.duration_s, summary=summary, attribution=attribution)
        self.evaluations.append(ev)
        if self.writer:
            self.writer.append(VERDICT, ev.to_record())
        return ev

    def confident(self) -> bool:
        if self.history.duration_s < self.options.min_decide_s or len(self.evaluations) < CONFIDENT_REPEATS:
            return False
        recent = self.evaluations[-CONFIDENT_REPEATS:]
        if not all(e.summary.leak for e in recent):
            return False
        if self.tracer is None:  # no tracer: the RSS verdict is all there is to be sure of
            return True
        return (
            len({e.top for e in recent}) == 1
            and recent[-1].top is not None
            and recent[-1].attribution.explained_fraction >= CONFIDENT_EXPLAINED
        )

    def _idle(self, timeout: float) -> None:
        """Between samples: the tracer's turn (one poll at a time, so a sample is never late
        by more than one), or a sleep without one."""
        if self.tracer:
            self.tracer.step(min(POLL_S, timeout))
        else:
            time.sleep(timeout)

    def run(self) -> InvestigationResult:
        reason, error = STOP_DURATION, None
        self._start_tracer()
        try:
            self.started = time.monotonic()
            # One pace for both: when a sample outlasts the interval the tracer still gets its
            # turn before the next, so neither starves the other.
            pace = Pace(self.options.interval, self.options.duration, idle=self._idle)
            last_eval = 0.0
            baseline = True
            for _ in pace:
                if baseline:  # errors here are the caller's (TargetGone, AccessDenied)
                    self._sample()
                    baseline = False
                    continue
                try:
                    self._sample()
                except (TargetGone, AccessDenied) as e:
                    reason, error = str(e), e
                    break
                evaluation = None
                if self.history.duration_s - last_eval >= EVALUATE_EVERY_S:
                    last_eval = self.history.duration_s
                    evaluation = self.evaluate()
                if self.on_update:
                    self.on_update(self, evaluation)
                if self.confident():
                    reason = STOP_CONFIDENT
                    break
        except KeyboardInterrupt:
            reason = STOP_INTERRUPTED
        finally:
            if self.tracer:
                self.tracer.stop(reason)
            self._stop_extras()
            self.memory.finish()
        if len(self.history) < 2:
            raise LeakhuntError(
                f"{self.target.describe()}: {reason} before a second sample; nothing to judge"
            )
        final = self.evaluate()
        final = replace(final, summary=final.summary.with_true_orphans())
        gdb = None
        if self.options.gdb_stacks and error is None and final.summary.leak and reason != STOP_INTERRUPTED:
            gdb = self._deepen(final)
            if gdb and gdb.stack:
                final = replace(final, attribution=_with_stack(final.attribution, gdb))
                if self.writer:
                    self.writer.append(VERDICT, final.to_record())
        if self._gpu:
            self._gpu.close()
        return InvestigationResult(
            target=self.target,
            choice=self.choice,
            no_tracer=self.no_tracer,
            history=self.history,
            summary=final.summary,
            attribution=final.attribution,
            evaluations=self.evaluations,
            stopped_because=reason,
            error=error,
            stats=self.tracer.stats if self.tracer else None,
            gdb=gdb,
            notes=self.notes,
            subprocesses=self.options.subprocesses,
            processes=self.memory.reports(final.summary, self.options.warmup, final.attribution),
            tree=self.memory.document(),
            device_unavailable=self.device_unavailable,
        )

    def progress(self) -> Progress:
        return Progress(
            target=self.target.describe(),
            elapsed_s=self.elapsed,
            duration_s=self.options.duration,
            samples=len(self.history),
            processes=self.memory.processes,
            subprocesses=self.options.subprocesses,
            tracer=self.choice.name if self.choice else f"no tracer ({self.no_tracer})",
            events=self.tracer.stats.events if self.tracer else 0,
            last=self.evaluations[-1] if self.evaluations else None,
        )

    def _deepen(self, ev: Evaluation) -> GdbPass | None:
        """Full stacks for the top traced caller from a short, budgeted gdb session."""
        top = next((c for c in ev.attribution.culprits if c.evidence == "traced mmap"), None)
        # Deep enough when the unwinder got past the caller's own frames (a stack cut at the
        # unwinder's depth limit already names who called).
        if top is None or len(top.stack) > SHALLOW_FRAMES:
            return None
        try:
            gdb_cls = backend_class("gdb")
            why = gdb_cls.unavailable_reason()
        except BackendUnavailable as e:
            why = e.reason
        # The pass spends what is left of --duration, never more: the duration is a promise.
        budget = min(GDB_SECONDS, self.options.duration - self.elapsed - 1.0)
        if not why and budget < GDB_MIN_SECONDS:
            why = "too little of --duration left for a gdb pass"
        if why:
            self.notes.append(f"no gdb stack for {top.title}: {why}")
            return None
        from leakhunt.gdb.backend import gdb_extra

        extra = gdb_extra(max_hits=GDB_HITS, time_budget=budget)
        try:  # the culprit's own process: in a tree, a child of the target maybe
            target = self.target if top.pid in (None, self.target.pid) else open_target(top.pid)
        except (TargetGone, AccessDenied) as e:
            self.notes.append(f"no gdb stack for {top.title}: {e}")
            return None
        backend = gdb_cls(target, TraceOptions(kinds=frozenset({EventKind.MMAP}), extra=extra))
        stacks: list[Stack] = []
        began = time.monotonic()
        try:
            backend.start()
            while time.monotonic() - began < budget + 0.5 and not backend.finished:
                for ev in backend.poll(0.5):
                    if ev.stack and _same_caller(ev.caller, ev.stack, top.library, top.symbol):
                        stacks.append(ev.stack)
                        if self.writer:
                            self.writer.append(STACKS, ev)
                if len(stacks) >= 5:
                    break
        except (BackendUnavailable, AccessDenied, TargetGone, LeakhuntError) as e:
            self.notes.append(f"gdb pass for {top.title} failed: {e}")
        finally:
            backend.stop()
        details = backend.details() if hasattr(backend, "details") else {}
        best = max(stacks, key=lambda s: len(s.frames), default=None)
        return GdbPass(
            culprit=top.title,
            stacks=len(stacks),
            stack=tuple(str(f) for f in best.frames) if best else (),
            stack_partial=best.partial if best else True,
            hits=details.get("hits"),
            cost=details.get("cost"),
            end=details.get("end"),
        )


def _same_caller(caller: Frame | None, stack: Stack, library: str, symbol: str) -> bool:
    frames = ((caller,) if caller else ()) + stack.frames
    return any(f.library == library and (f.symbol or "") == symbol for f in frames)


def _allocator_culprit(c) -> bool:
    """A traced culprit whose caller is an allocator's own code (malloc's sysmalloc, jemalloc)."""
    return allocator_of(Frame(0, c.library, c.symbol or None)) is not None


def with_creators(attribution: Attribution, creators: CreatorTracer) -> Attribution:
    """Shared-object culprits with who created their objects (the holder is the culprit's pid)."""
    out = []
    for c in attribution.culprits:
        pattern = c.segments or (c.library if c.evidence == "shm segment names" else None)
        if pattern:
            found = creators.of(pattern)
            if found:
                c = replace(c, created_by=tuple(x.to_json() for x in found[:5]))
        out.append(c)
    return replace(attribution, culprits=out)


def _with_stack(attribution: Attribution, gdb: GdbPass) -> Attribution:
    culprits = [
        replace(c, stack=gdb.stack, stack_partial=gdb.stack_partial) if c.title == gdb.culprit else c
        for c in attribution.culprits
    ]
    return replace(attribution, culprits=culprits)
