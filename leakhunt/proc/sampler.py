"""The sampling loop: a full smaps snapshot of the target every interval.

It copes with the target going away or changing credentials mid-run: it keeps every sample it
has and says why it stopped, instead of raising away the evidence.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from leakhunt.errors import AccessDenied, TargetGone
from leakhunt.proc.classes import RegionClass
from leakhunt.proc.growth import GroupKey, GroupStat, groups
from leakhunt.proc.smaps import Snapshot, parse_smaps
from leakhunt.proc.target import Target, proc_read, read_status


@dataclass(frozen=True)
class Sample:
    """One look at the target: its full smaps and the totals derived from it."""

    seq: int
    ts: float                # wall clock (time.time())
    t: float                 # seconds since the first sample (monotonic)
    pid: int
    snapshot: Snapshot
    status: dict[str, int]   # /proc/PID/status memory fields, bytes
    cost_s: float            # how long reading and parsing took
    classes: dict[RegionClass, int] = field(default_factory=dict)
    groups: dict[GroupKey, GroupStat] = field(default_factory=dict)
    raw: bytes | None = None  # the smaps text, kept only when a recording wants it

    @property
    def rss(self) -> int:
        return sum(self.classes.values())

    def to_record(self, snapshot_path: str | None = None) -> dict:
        return {
            "seq": self.seq, "ts": self.ts, "t": self.t, "pid": self.pid, "rss": self.rss,
            "regions": len(self.snapshot), "cost_s": self.cost_s, "status": self.status,
            "classes": {c.value: v for c, v in self.classes.items()},
            "groups": [[c.value, path, g.rss, g.regions] for (c, path), g in self.groups.items()
                       if g.rss],
            "snapshot": snapshot_path,
        }


class History:
    """What a run keeps of its samples: totals and group sizes for every sample, full
    snapshots only of the first and the latest (a big process's snapshot is megabytes)."""

    def __init__(self) -> None:
        self.t: list[float] = []
        self.ts: list[float] = []
        self.rss: list[int] = []
        self.classes: dict[RegionClass, list[int]] = {c: [] for c in RegionClass}
        self.group_rss: list[dict[GroupKey, int]] = []
        self.group_regions: dict[GroupKey, int] = {}
        self.first: Sample | None = None
        self.last: Sample | None = None
        self.cost_s: list[float] = []

    def add(self, sample: Sample) -> None:
        if self.first is None:
            self.first = sample
        self.last = sample
        self.t.append(sample.t)
        self.ts.append(sample.ts)
        self.rss.append(sample.rss)
        self.cost_s.append(sample.cost_s)
        for c, series in self.classes.items():
            series.append(sample.classes.get(c, 0))
        self.group_rss.append({k: g.rss for k, g in sample.groups.items() if g.rss})
        self.group_regions = {k: g.regions for k, g in sample.groups.items()}

    def __len__(self) -> int:
        return len(self.t)

    def group_series(self, key: GroupKey) -> list[int]:
        return [g.get(key, 0) for g in self.group_rss]

    def group_keys(self) -> set[GroupKey]:
        keys: set[GroupKey] = set()
        for g in self.group_rss:
            keys.update(g)
        return keys

    @property
    def duration_s(self) -> float:
        return self.t[-1] - self.t[0] if self.t else 0.0


STOP_DURATION = "duration reached"
STOP_INTERRUPTED = "interrupted"
STOP_REQUESTED = "stopped"


@dataclass
class SamplingResult:
    history: History
    stopped_because: str
    error: Exception | None = None   # TargetGone / AccessDenied that ended the run early

    @property
    def target_lost(self) -> bool:
        return self.error is not None


class Sampler:
    """Takes samples of one target at a fixed interval."""

    def __init__(self, target: Target, interval: float = 1.0, keep_raw: bool = False) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.target = target
        self.interval = interval
        self.keep_raw = keep_raw
        self._t0: float | None = None
        self._seq = 0

    def take(self) -> Sample:
        """One sample now. Raises TargetGone or AccessDenied."""
        pid = self.target.pid
        began = time.monotonic()
        if self._t0 is None:
            self._t0 = began
        raw = proc_read(pid, "smaps")
        snapshot = parse_smaps(raw, source=f"/proc/{pid}/smaps")
        status = read_status(pid)
        if not len(snapshot) and not self.target.alive():
            raise TargetGone(pid, f"process {pid} exited")
        cost = time.monotonic() - began
        sample = Sample(self._seq, time.time(), began - self._t0, pid, snapshot, status, cost,
                        snapshot.class_totals(), groups(snapshot), raw if self.keep_raw else None)
        self._seq += 1
        return sample

    def run(self, duration: float | None, on_sample: Callable[[Sample, History], None] | None = None,
            stop: threading.Event | None = None) -> SamplingResult:
        """Sample until ``duration`` seconds passed (None: until stopped), Ctrl-C, or the target is lost.

        The first sample's errors propagate (nothing to keep yet); later ones end the run and are
        returned in ``SamplingResult.error``.
        """
        stop = stop or threading.Event()
        history = History()
        deadline = None if duration is None else time.monotonic() + duration
        next_at = time.monotonic()
        reason = STOP_DURATION
        error: Exception | None = None
        try:
            while True:
                try:
                    sample = self.take()
                except (TargetGone, AccessDenied) as e:
                    if not len(history):
                        raise
                    error, reason = e, str(e)
                    break
                history.add(sample)
                if on_sample is not None:
                    on_sample(sample, history)
                next_at += self.interval
                now = time.monotonic()
                if next_at < now:  # a slow sample: skip ahead rather than fire a burst
                    next_at = now
                if deadline is not None and next_at > deadline + 1e-3:
                    break
                if stop.wait(max(0.0, next_at - now)):
                    reason = STOP_REQUESTED
                    break
        except KeyboardInterrupt:
            reason = STOP_INTERRUPTED
        return SamplingResult(history, reason, error)
