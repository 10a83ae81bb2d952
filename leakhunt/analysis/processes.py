"""One document per process of a target, the same in watch's, investigate's and ci's JSON: one
process is a tree of one, with one document. (export publishes the same summaries as Prometheus
series over a rolling window; see export.py for why it keeps no tree sampler.)

A tree is judged on its totals, shared memory counted once (proc.tree). Each process also keeps
its own history and its own verdict. A process is said to leak (``leak``) when its own verdict
says so, the tree leaks, and it makes at least MIN_SHARE of the tree's growth: a neighbour creeping
by a fraction of a MiB a minute is not named beside the process that grows by hundreds.
``own_verdict_leak`` is its own verdict alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from leakhunt.analysis.correlate import MIN_SHARE, Attribution
from leakhunt.analysis.summary import MemorySummary, summarize
from leakhunt.analysis.verdict import MIN_SLOPE
from leakhunt.proc.tree import ProcessTrack, TreeSampler

#: How the totals count, said in every tree document: a tree's, and a tree of one's.
TREE_COUNTING = "private pages of every process plus each shared object once"
ONE_COUNTING = "the process's own RSS"


@dataclass(frozen=True)
class ProcessReport:
    """One process of a tree: who it is, how its memory went, its verdicts, its culprits."""

    pid: int
    ppid: int | None
    root: bool  # the process the command was given
    cmdline: str
    nspid: list[int]
    first_seen_s: float  # seconds into the run (0: there from the start)
    ended: str | None  # why it stopped being sampled: "exited", "permission lost"
    ended_at_s: float | None
    samples: int
    rss_bytes_start: int
    rss_bytes_end: int
    pss_bytes: int
    uss_bytes: int
    rss_slope_bytes_per_s: float
    slope_interval: list[float]  # [lo, hi] of the RSS slope
    footprint_bytes_start: int
    footprint_bytes_end: int
    footprint_slope_bytes_per_s: float
    held_shm: dict
    leak: bool  # it leaks, as the tree sees it (the module's docstring)
    own_verdict_leak: bool
    plateau: bool  # its own verdict found the growth levelling off
    verdict: str
    top_groups: list[dict]
    culprits: list[str]  # the titles of the culprits that live in it (investigate)

    def to_json(self) -> dict:
        return asdict(self)


def summaries(
    sampler: TreeSampler,
    tracks: Iterable[ProcessTrack],
    tree: MemorySummary,
    warmup: float | None,
    least: int = 1,
    min_slope: float = MIN_SLOPE,
) -> dict[int, MemorySummary]:
    """Each process's own summary, for the processes sampled at least ``least`` times, judged at
    ``min_slope`` as the tree was. A tree of one has one history, the root's: its summary is the
    tree's, not summarized a second time."""
    return {
        t.target.pid: tree
        if t.history is sampler.tree
        else summarize(t.history, warmup_s=warmup, min_slope=min_slope)
        for t in tracks
        if len(t.history) >= least
    }


def leaking(sampler: TreeSampler, tree: MemorySummary, own: dict[int, MemorySummary]) -> set[int]:
    """The live processes that leak, as the tree sees them (see the module's docstring); ``own``
    holds the summaries of the processes sampled twice or more."""
    if not tree.leak:
        return set()
    return {
        t.target.pid
        for t in sampler.live_tracks()
        if (s := own.get(t.target.pid)) is not None
        and s.leak
        and s.main.growth >= MIN_SHARE * tree.main.growth
    }


def process_reports(
    sampler: TreeSampler,
    tree: MemorySummary,
    warmup: float | None,
    attribution: Attribution | None = None,
    min_slope: float = MIN_SLOPE,
) -> list[ProcessReport]:
    """Every process the tree has sampled, ended ones included, with the culprits that live in it;
    each judged at ``min_slope`` (ci: its limit), as the tree was."""
    own = summaries(sampler, sampler.tracks.values(), tree, warmup, min_slope=min_slope)
    twice = {t.target.pid for t in sampler.tracks.values() if len(t.history) >= 2}
    accused = leaking(sampler, tree, {p: s for p, s in own.items() if p in twice})
    reports = []
    for track in sampler.tracks.values():
        pid = track.target.pid
        s = own.get(pid)
        if s is None:
            continue
        last = track.history.last.snapshot
        culprits = [c.title for c in attribution.culprits if c.pid == pid] if attribution and accused else []
        reports.append(
            ProcessReport(
                pid=pid,
                ppid=track.ppid,
                root=track is sampler.root,
                cmdline=track.target.cmdline,
                nspid=list(track.target.nspid),
                first_seen_s=track.first_seen,
                ended=track.ended,
                ended_at_s=track.ended_at,
                samples=s.samples,
                rss_bytes_start=s.rss.start,
                rss_bytes_end=s.rss.end,
                pss_bytes=last.total("Pss"),
                uss_bytes=last.uss(),
                rss_slope_bytes_per_s=s.rss.verdict.trend.slope,
                slope_interval=s.rss.verdict.trend.interval,
                footprint_bytes_start=s.main.start,
                footprint_bytes_end=s.main.end,
                footprint_slope_bytes_per_s=s.verdict.trend.slope,
                held_shm=s.held_json(),
                leak=pid in accused,
                own_verdict_leak=s.leak,
                plateau=s.verdict.plateau,
                verdict=s.verdict.reason,
                top_groups=[g.to_json() for g in s.groups[:5]],
                culprits=culprits,
            )
        )
    return reports


def tree_document(sampler: TreeSampler) -> dict:
    """How the tree's totals count, its PSS and USS sums, and the children it could not read."""
    pss, uss = sampler.pss, sampler.uss
    return {
        "rss_counting": TREE_COUNTING if sampler.follow else ONE_COUNTING,
        "pss_bytes_start": pss[0] if pss else None,
        "pss_bytes_end": pss[-1] if pss else None,
        "uss_bytes_start": uss[0] if uss else None,
        "uss_bytes_end": uss[-1] if uss else None,
        "unreadable": {str(p): why for p, why in sampler.skipped.items()},
        "ended_forgotten": sampler.forgotten,
    }
