"""The memory side of `investigate --subprocesses`: the whole tree under the pid sampled every
interval (children that appear later picked up, children that exit reported, not errors), each
live process's own evidence for the correlator, and one document per process for --json.

The tree's RSS series counts shared memory once (proc.tree); each process keeps its own history,
verdict and culprits, which carry its pid. A process is called leaking when its own verdict says so
and the tree leaks and it makes at least MIN_SHARE of the tree's growth: a neighbour creeping by a
fraction of a MiB a minute is not named beside the process that grows by hundreds.
"""

from __future__ import annotations

import psutil

from leakhunt.analysis.correlate import MIN_SHARE, Attribution
from leakhunt.analysis.correlate_tree import ProcessEvidence
from leakhunt.analysis.summary import MemorySummary, summarize
from leakhunt.gpu import NvmlReader
from leakhunt.proc.sampler import History
from leakhunt.proc.target import Target
from leakhunt.proc.tree import ProcessTrack, TreeSampler
from leakhunt.record import SessionWriter, TreeRecorder
from leakhunt.trace.tree_trace import TreeTrace
from leakhunt.units import format_duration

TREE_COUNTING = "private pages of every process plus each shared object once"


class TreeMemory:
    """A TreeSampler driven one tick at a time by the investigation loop."""

    def __init__(
        self,
        root: Target,
        interval: float,
        keep_raw: bool,
        gpu: NvmlReader | None,
        writer: SessionWriter | None,
    ) -> None:
        self.sampler = TreeSampler(root, interval, keep_raw, gpu)
        self.recorder = TreeRecorder(writer) if writer else None
        self.reported_ends: set[int] = set()

    @property
    def history(self) -> History:
        return self.sampler.tree

    @property
    def root(self) -> ProcessTrack:
        return self.sampler.root

    def existing(self) -> list[Target]:
        """The processes under the root now (call once the tracer runs: later ones it follows)."""
        tracks = self.sampler.discover()
        for track in tracks:
            track.first_seen = 0.0  # there from the start, not picked up later
        return [track.target for track in tracks]

    def take(self) -> list[Target]:
        """One sample of every process; returns those seen for the first time. Raises TargetGone
        when the root is gone."""
        known = set(self.sampler.tracks)
        samples = self.sampler.tick()
        if self.recorder:
            self.recorder(samples, self.sampler, self.sampler.tree)
        return [t.target for pid, t in self.sampler.tracks.items() if pid not in known]

    def finish(self) -> None:
        if self.recorder:
            self.recorder.flush_last()

    def ended_notes(self) -> list[str]:
        """One line for each child that exited (or became unreadable) since the last call."""
        notes = []
        for pid, track in self.sampler.tracks.items():
            if track.ended and pid not in self.reported_ends:
                self.reported_ends.add(pid)
                notes.append(
                    f"{track.target.describe()} {track.ended} after {format_duration(track.ended_at or 0)}; "
                    "its growth is left out of the attribution"
                )
        return notes

    def leaking(self, tree: MemorySummary, warmup: float | None) -> set[int]:
        """The live processes that leak, as the tree sees them (see the module's docstring)."""
        if not tree.leak:
            return set()
        out = set()
        for track in self.sampler.live_tracks():
            if len(track.history) >= 2:
                s = summarize(track.history, warmup_s=warmup)
                if s.leak and s.main.growth >= MIN_SHARE * tree.main.growth:
                    out.add(track.target.pid)
        return out

    def evidence(self, tracer: TreeTrace | None, leaking: set[int]) -> list[ProcessEvidence]:
        """Each live process with two samples or more: its window, its mappings, whether it leaks."""
        out = []
        for track in self.sampler.live_tracks():
            h = track.history
            if len(h) < 2:
                continue
            out.append(
                ProcessEvidence(
                    track.target.pid,
                    h.first.charged(),
                    h.last.charged(),
                    tracer.outstanding(track.target.pid) if tracer else [],
                    h.duration_s,
                    track.target.pid in leaking,
                )
            )
        return out

    def documents(self, warmup: float | None, attribution: Attribution, leaking: set[int]) -> list[dict]:
        """Per process: who, how its RSS went, whether it leaks (and what its own verdict says), its
        top groups, and the culprits that live in it."""
        docs = []
        for track in self.sampler.tracks.values():
            h = track.history
            if not len(h):
                continue
            s = summarize(h, warmup_s=warmup)
            last = h.last.snapshot
            pid = track.target.pid
            docs.append(
                {
                    "pid": pid,
                    "ppid": _parent(pid),
                    "root": track is self.root,
                    "cmdline": track.target.cmdline,
                    "nspid": list(track.target.nspid),
                    "first_seen_s": track.first_seen,
                    "ended": track.ended,
                    "ended_at_s": track.ended_at,
                    "samples": s.samples,
                    "rss_bytes_start": s.rss.start,
                    "rss_bytes_end": s.rss.end,
                    "pss_bytes": last.total("Pss"),
                    "uss_bytes": last.total("Private_Clean") + last.total("Private_Dirty"),
                    "rss_slope_bytes_per_s": s.rss.verdict.trend.slope,
                    "slope_interval": s.rss.verdict.trend.interval,
                    "leak": pid in leaking,
                    "own_verdict_leak": s.leak,
                    "footprint_bytes_start": s.main.start,
                    "footprint_bytes_end": s.main.end,
                    "footprint_slope_bytes_per_s": s.verdict.trend.slope,
                    "held_shm": s.held_json(),
                    "verdict": s.verdict.reason,
                    "top_groups": [g.to_json() for g in s.groups[:5]],
                    "culprits": [c.title for c in attribution.culprits if c.pid == pid] if leaking else [],
                }
            )
        return docs

    def tree_document(self) -> dict:
        pss, uss = self.sampler.pss, self.sampler.uss
        return {
            "rss_counting": TREE_COUNTING,
            "pss_bytes_start": pss[0] if pss else None,
            "pss_bytes_end": pss[-1] if pss else None,
            "uss_bytes_start": uss[0] if uss else None,
            "uss_bytes_end": uss[-1] if uss else None,
            "unreadable": {str(p): why for p, why in self.sampler.skipped.items()},
        }


def _parent(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None  # exited


def short_command(cmdline: str) -> str:
    """'/opt/venv/bin/python3 -m engine 6' -> 'python3 -m engine 6': the program's name, not its path."""
    program, _, rest = cmdline.partition(" ")
    return f"{program.rsplit('/', 1)[-1]} {rest}".strip()
