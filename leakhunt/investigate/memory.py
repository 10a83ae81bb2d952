"""The memory side of `investigate`: what is sampled each tick, how its growth is attributed, and
which per-process documents come out.

The target is a set of processes (proc.tree.TreeSampler): the pid alone, a tree of one, or with
``--subprocesses`` the whole tree under it, children that appear later picked up, children that
exit reported, not errors. The set's RSS series counts shared memory once; each process keeps
its own history, verdict and culprits, which carry its pid. Which processes leak, and their
documents, are analysis.processes': the same as watch's. A tree of one costs what one process
does: its totals are its own samples, and its attribution is the one-process correlator's.
"""

from __future__ import annotations

from leakhunt.analysis.correlate import Attribution
from leakhunt.analysis.correlate_tree import ProcessEvidence, correlate_tree
from leakhunt.analysis.processes import ProcessReport, leaking, process_reports, summaries, tree_document
from leakhunt.analysis.summary import MemorySummary
from leakhunt.gpu import NvmlReader
from leakhunt.proc.sampler import History
from leakhunt.proc.target import Target
from leakhunt.proc.tree import TreeSampler
from leakhunt.record import SessionWriter, TreeRecorder
from leakhunt.trace.faults import FaultView
from leakhunt.trace.tree_trace import TreeTrace
from leakhunt.units import format_duration


class TargetMemory:
    """The target's processes: a TreeSampler driven one tick at a time."""

    def __init__(
        self,
        root: Target,
        interval: float,
        gpu: NvmlReader | None,
        writer: SessionWriter | None,
        follow: bool,
    ) -> None:
        self.sampler = TreeSampler(root, interval, writer is not None, gpu, follow=follow)
        self.recorder = TreeRecorder(writer, follow) if writer else None
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
        own = summaries(self.sampler, self.sampler.live_tracks(), summary, warmup, least=2)
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
