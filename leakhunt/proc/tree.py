"""A target is a set of processes: the one pid given, a tree of one, or with --subprocesses every
process under it, those that appear later included. Each process has its own history and
verdict; the set has honest totals. watch, investigate and ci sample through TreeSampler, so
that one process and a tree take the same path (export keeps a window of its own: export.py).

Tree totals never add up RSS: a /dev/shm segment or a library mapped by three processes would
count three times. A process's memory is its private pages plus its shared ones; the tree holds
every process's private pages plus, for each shared object (keyed by device and inode, or by
address for anonymous pages still shared copy-on-write after fork), the most any one process
has resident. PSS and USS sums are reported beside it. A tick that sampled one process has
nothing to count once: its totals are that process's own (the kernel's RSS), and the pass over
every mapping that deduplicates is skipped, which at 50k mappings costs more than the sample.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import psutil

from leakhunt.errors import AccessDenied, TargetGone
from leakhunt.gpu import NvmlReader
from leakhunt.proc.classes import CLASSES, RegionClass
from leakhunt.proc.growth import GroupKey, group_path
from leakhunt.proc.sampler import STOP_INTERRUPTED, History, Pace, Sample, Sampler
from leakhunt.proc.shmem import HeldShm
from leakhunt.proc.smaps import Snapshot
from leakhunt.proc.target import Target, open_target


@dataclass
class ProcessTrack:
    """One process of the tree and everything sampled from it."""

    target: Target
    sampler: Sampler
    history: History = field(default_factory=History)
    first_seen: float = 0.0  # seconds since the tree's first sample
    ppid: int | None = None  # its parent when it was first seen
    ended: str | None = None  # why it stopped being sampled ("exited", "permission lost")
    ended_at: float | None = None


@dataclass
class TreeTotals:
    rss: int  # deduplicated: private pages plus each shared object once
    pss: int
    uss: int
    classes: dict[RegionClass, int]
    groups: dict[GroupKey, int]
    group_regions: dict[GroupKey, int]


def tree_totals(snapshots: list[Snapshot]) -> TreeTotals:
    """Memory of several processes with every shared object counted once."""
    classes = dict.fromkeys(CLASSES, 0)
    groups: dict[GroupKey, int] = {}
    regions: dict[GroupKey, int] = {}
    shared: dict[tuple, tuple[int, RegionClass, str]] = {}
    pss = uss = 0
    for snap in snapshots:
        private = snap.private()
        shared_now = snap.column("Shared_Clean") + snap.column("Shared_Dirty")
        pss += snap.total("Pss")
        uss += int(private.sum())
        for i in np.flatnonzero(private):
            key = (CLASSES[snap.classes[i]], group_path(int(snap.classes[i]), snap.path[i]))
            classes[key[0]] += int(private[i])
            groups[key] = groups.get(key, 0) + int(private[i])
        for i in np.flatnonzero(shared_now):
            obj = (
                (snap.dev[i], int(snap.inode[i]), int(snap.offset[i]))
                if snap.inode[i]
                else ("anon", int(snap.start[i]))
            )
            size = int(shared_now[i])
            if obj not in shared or shared[obj][0] < size:
                shared[obj] = (size, CLASSES[snap.classes[i]], group_path(int(snap.classes[i]), snap.path[i]))
        for code, path in zip(snap.classes.tolist(), snap.path):
            key = (CLASSES[code], group_path(code, path))
            regions[key] = regions.get(key, 0) + 1
    for size, klass, path in shared.values():
        classes[klass] += size
        groups[(klass, path)] = groups.get((klass, path), 0) + size
    return TreeTotals(sum(classes.values()), pss, uss, classes, groups, regions)


def own_totals(history: History) -> TreeTotals:
    """A process's latest entry as a tree's totals: nothing is shared with anyone else to count
    once, and History.add has already summed what a tree needs."""
    h = history
    classes = {c: series[-1] for c, series in h.classes.items()}
    return TreeTotals(h.rss[-1], h.pss[-1], h.uss[-1], classes, h.group_rss[-1], h.group_regions)


def _deduplicated(samples: list[Sample]) -> TreeTotals:
    """Several processes' totals with shared objects counted once. A cheap sample
    (Sampler.full_every) stands on its last full snapshot: what moved since, by its status
    counters, is added on top (as the process's own, private pages)."""
    totals = tree_totals([s.snapshot for s in samples])
    for s in samples:
        if s.full:
            continue
        for klass, v in s.snapshot.class_totals().items():
            moved = s.classes.get(klass, 0) - v
            totals.classes[klass] = totals.classes.get(klass, 0) + moved
            totals.rss += moved
    return totals


@dataclass
class TreeResult:
    root: ProcessTrack
    tracks: list[ProcessTrack]
    tree: History  # the deduplicated totals, one entry per tick
    pss: list[int]
    uss: list[int]
    stopped_because: str
    error: Exception | None = None  # the root process was lost


#: Ended children kept (with their histories and last snapshots) for the per-process documents:
#: a server that forks a worker per request, watched for a day, must not keep them all.
MAX_ENDED = 64
#: Children that could not be read, remembered so that they are not tried again every tick.
MAX_SKIPPED = 256


class TreeSampler:
    """Samples a pid, and with ``follow`` all its descendants, every interval, picking up new
    children as they come. Memory stays bounded: the MAX_ENDED children that ended last are kept,
    older ones are counted in ``forgotten`` and dropped."""

    def __init__(
        self,
        root: Target,
        interval: float = 1.0,
        keep_raw: bool = False,
        gpu: NvmlReader | None = None,
        full_every: int = 1,
        follow: bool = True,
    ) -> None:
        self.follow = follow  # False: the pid alone, a tree of one
        self.interval = interval
        self.full_every = full_every
        self.keep_raw = keep_raw
        self.gpu = gpu
        self.t0 = time.monotonic()
        self.root = ProcessTrack(
            root,
            Sampler(root, interval, keep_raw, t0=self.t0, gpu=gpu, full_every=full_every),
            ppid=_ppid(root.pid),
        )
        self.tracks: dict[int, ProcessTrack] = {root.pid: self.root}
        self.skipped: dict[int, str] = {}  # children we could not read, and why (the latest ones)
        self.forgotten = 0  # ended children dropped past MAX_ENDED
        # The totals, one entry per tick: a tree of one's are its process's own history.
        self.tree = History() if follow else self.root.history

    def discover(self) -> list[ProcessTrack]:
        """Start tracking children that appeared since the last call; returns the new tracks."""
        if not self.follow:
            return []
        try:
            children = psutil.Process(self.root.target.pid).children(recursive=True)
        except psutil.Error:
            return []
        new = []
        for child in children:
            if child.pid in self.tracks or child.pid in self.skipped:
                continue
            try:
                target = open_target(child.pid)
            except (TargetGone, AccessDenied) as e:
                self.skipped[child.pid] = str(e)
                if len(self.skipped) > MAX_SKIPPED:
                    del self.skipped[next(iter(self.skipped))]  # the oldest
                continue
            track = ProcessTrack(
                target,
                Sampler(
                    target, self.interval, self.keep_raw, t0=self.t0, gpu=self.gpu, full_every=self.full_every
                ),
                first_seen=time.monotonic() - self.t0,
                ppid=_ppid(child.pid),
            )
            self.tracks[child.pid] = track
            new.append(track)
        return new

    def live_tracks(self) -> list[ProcessTrack]:
        return [t for t in self.tracks.values() if t.ended is None]

    def tick(self) -> list[Sample]:
        """One look at the whole set: new children picked up (``follow``), every live process
        sampled, the totals appended to ``self.tree``; returns the samples. Children that are gone
        are marked ended; the root's TargetGone or AccessDenied propagates, and ends the run."""
        self.discover()
        began = time.monotonic()
        samples = []
        for track in self.live_tracks():
            try:
                sample = track.sampler.take()
            except (TargetGone, AccessDenied) as e:
                track.ended = "exited" if isinstance(e, TargetGone) else "permission lost"
                track.ended_at = began - self.t0
                if track is self.root:
                    raise
                continue
            track.history.add(sample)
            samples.append(sample)
        self._forget_ended()
        if self.follow:
            self._append_totals(samples, began)
        return samples

    def _append_totals(self, samples: list[Sample], began: float) -> None:
        """The tree's entry for one tick: its totals with every shared object counted once."""
        alone = len(samples) == 1
        totals = own_totals(self.tracks[samples[0].pid].history) if alone else _deduplicated(samples)
        device = sum(s.gpu_bytes for s in samples if s.gpu_bytes) if self.gpu is not None else None
        held = HeldShm.union([s.held for s in samples if s.held is not None])
        root = samples[0]  # the root is sampled first, and its loss has raised
        self.tree.append(
            began - self.t0,
            time.time(),
            totals.rss,
            totals.classes,
            totals.groups,
            totals.group_regions,
            time.monotonic() - began,
            device,
            held.totals(),
            root.cgroup,
            root.dev_shm,
            held,
            totals.pss,
            totals.uss,
        )

    def _forget_ended(self) -> None:
        ended = [t for t in self.tracks.values() if t.ended is not None]
        if len(ended) <= MAX_ENDED:
            return
        ended.sort(key=lambda t: t.ended_at or 0.0)
        for track in ended[: len(ended) - MAX_ENDED]:
            del self.tracks[track.target.pid]
            self.forgotten += 1

    @property
    def full_samples(self) -> int:
        """Full smaps reads, every process's (Sampler.full_every)."""
        return sum(t.sampler.full_samples for t in self.tracks.values())

    @property
    def pss(self) -> list[int]:
        return self.tree.pss

    @property
    def uss(self) -> list[int]:
        return self.tree.uss

    def run(
        self,
        duration: float | None,
        on_tick: Callable[[list[Sample], TreeSampler, History], None] | None = None,
        stop: threading.Event | None = None,
    ) -> TreeResult:
        pace = Pace(self.interval, duration, stop)
        error = None
        reason = None
        try:
            for _ in pace:
                try:
                    samples = self.tick()
                except (TargetGone, AccessDenied) as e:
                    if not len(self.tree):
                        raise
                    error, reason = e, str(e)
                    break
                if on_tick is not None:
                    on_tick(samples, self, self.tree)
        except KeyboardInterrupt:
            reason = STOP_INTERRUPTED
        return TreeResult(
            self.root, list(self.tracks.values()), self.tree, self.pss, self.uss, reason or pace.reason, error
        )


def _ppid(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None  # exited


def descendants(pid: int) -> tuple[int, ...]:
    """The pids under ``pid`` now (none if it is gone)."""
    try:
        return tuple(p.pid for p in psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return ()


def children_hint(pid: int) -> str | None:
    """One line for a target that has children but is watched alone."""
    n = len(descendants(pid))
    if not n:
        return None
    return (
        f"pid {pid} has {n} child process{'es' if n > 1 else ''}: add --subprocesses to follow the whole tree"
    )
