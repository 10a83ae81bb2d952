"""The memory side of `investigate`: what is sampled each tick, how its growth is attributed, and
which per-process documents come out. The loop drives either strategy through the same five
calls (existing, take, attribute, reports, finish) and never asks which one it holds.

- ``ProcessMemory``: one process, sampled in full each interval, attributed by its own
  snapshots and traced mappings.
- ``TreeMemory`` (``--subprocesses``): the whole tree under the pid, children that appear later
  picked up, children that exit reported, not errors. The tree's RSS series counts shared memory
  once (proc.tree); each process keeps its own history, verdict and culprits, which carry its
  pid. Which processes leak, and their documents, are analysis.processes': the same as watch's.

Why two and not a tree of one: a TreeSampler tick adds a pass over every mapping to count shared
pages once (tree_totals), which at 50k mappings costs more than the sample; and one process needs
no deduplication.
"""

from __future__ import annotations

from leakhunt.analysis.correlate import Attribution, correlate
from leakhunt.analysis.correlate_tree import ProcessEvidence, correlate_tree
from leakhunt.analysis.processes import ProcessReport, leaking, process_reports, summaries, tree_document
from leakhunt.analysis.summary import MemorySummary
from leakhunt.gpu import NvmlReader
from leakhunt.proc.sampler import History, Sampler
from leakhunt.proc.target import Target
from leakhunt.proc.tree import TreeSampler
from leakhunt.record import SampleRecorder, SessionWriter, TreeRecorder
from leakhunt.trace.faults import FaultView
from leakhunt.trace.tree_trace import TreeTrace
from leakhunt.units import format_duration


class ProcessMemory:
    """One process: a Sampler driven one tick at a time."""

    processes: int | None = None  # live processes: only a tree counts them

    def __init__(
        self,
        target: Target,
        interval: float,
        gpu: NvmlReader | None,
        writer: SessionWriter | None,
    ) -> None:
        self.target = target
        self.sampler = Sampler(target, interval, keep_raw=writer is not None, gpu=gpu)
        self.recorder = SampleRecorder(writer) if writer else None
        self.history = History()

    def existing(self) -> list[Target]:
        return []

    def pids(self) -> list[int]:
        return [self.target.pid]

    def take(self) -> tuple[list[Target], list[str]]:
        """One sample; raises TargetGone when the process is gone. No new processes, no notes."""
        sample = self.sampler.take()
        self.history.add(sample)
        if self.recorder:
            self.recorder(sample)
        return [], []

    def attribute(
        self, summary: MemorySummary, warmup: float | None, tracer: TreeTrace | None, faults: FaultView | None
    ) -> Attribution:
        first, last = self.history.first, self.history.last
        return correlate(
            first.charged(),
            last.charged(),
            tracer.outstanding(self.target.pid) if tracer else [],
            self.history.duration_s,
            pid=self.target.pid,
            faults=faults,
        )

    def reports(self, summary: MemorySummary, warmup: float | None, attribution: Attribution) -> None:
        return None  # the result's own summary and culprits are the process's

    def document(self) -> None:
        return None

    def finish(self) -> None:
        if self.recorder:
            self.recorder.flush_last()


class TreeMemory:
    """The tree under a pid: a TreeSampler driven one tick at a time."""

    def __init__(
        self,
        root: Target,
        interval: float,
        gpu: NvmlReader | None,
        writer: SessionWriter | None,
    ) -> None:
        self.sampler = TreeSampler(root, interval, writer is not None, gpu)
        self.recorder = TreeRecorder(writer) if writer else None
        self.reported_ends: set[int] = set()
        self.leaking: set[int] = set()  # the processes that leak, at the last attribution

    @property
    def history(self) -> History:
        return self.sampler.tree

    @property
    def processes(self) -> int:
        return len(self.sampler.live_tracks())

    def existing(self) -> list[Target]:
        """The processes under the root now (call once the tracer runs: later ones it follows)."""
        tracks = self.sampler.discover()
        for track in tracks:
            track.first_seen = 0.0  # there from the start, not picked up later
        return [track.target for track in tracks]

    def pids(self) -> list[int]:
        """The live processes, root first."""
        return [t.target.pid for t in self.sampler.live_tracks()]

    def take(self) -> tuple[list[Target], list[str]]:
        """One sample of every process: the processes seen for the first time, and a note for
        each child that ended since. Raises TargetGone when the root is gone."""
        known = set(self.sampler.tracks)
        samples = self.sampler.tick()
        if self.recorder:
            self.recorder(samples, self.sampler, self.sampler.tree)
        born = [t.target for pid, t in self.sampler.tracks.items() if pid not in known]
        return born, self._ended_notes()

    def _ended_notes(self) -> list[str]:
        self.reported_ends &= self.sampler.tracks.keys()  # those forgotten since (proc.tree.MAX_ENDED)
        notes = []
        for pid, track in self.sampler.tracks.items():
            if track.ended and pid not in self.reported_ends:
                self.reported_ends.add(pid)
                notes.append(
                    f"{track.target.describe()} {track.ended} after {format_duration(track.ended_at or 0)}; "
                    "its growth is left out of the attribution"
                )
        return notes

    def attribute(
        self, summary: MemorySummary, warmup: float | None, tracer: TreeTrace | None, faults: FaultView | None
    ) -> Attribution:
        own = summaries(self.sampler.live_tracks(), warmup, least=2)
        self.leaking = leaking(self.sampler, summary, own)
        return correlate_tree(self._evidence(tracer), self.history.duration_s, faults=faults)

    def _evidence(self, tracer: TreeTrace | None) -> list[ProcessEvidence]:
        """Each live process with two samples or more: its window, its mappings, whether it leaks."""
        out = []
        for track in self.sampler.live_tracks():
            h = track.history
            if len(h) < 2:
                continue
            pid = track.target.pid
            out.append(
                ProcessEvidence(
                    pid=pid,
                    before=h.first.charged(),
                    after=h.last.charged(),
                    outstanding=tracer.outstanding(pid) if tracer else [],
                    duration_s=h.duration_s,
                    leak=pid in self.leaking,
                )
            )
        return out

    def reports(
        self, summary: MemorySummary, warmup: float | None, attribution: Attribution
    ) -> list[ProcessReport]:
        return process_reports(self.sampler, summary, warmup, attribution)

    def document(self) -> dict:
        return tree_document(self.sampler)

    def finish(self) -> None:
        if self.recorder:
            self.recorder.flush_last()
