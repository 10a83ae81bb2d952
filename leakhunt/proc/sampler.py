"""One process's samples: its memory each time it is asked, a full smaps snapshot when that says
something new; History, what a run keeps of them; Pace, the interval every loop keeps. The loops
drive Samplers through proc.tree.TreeSampler, where one process is a tree of one.

A full smaps read walks every mapping and page table under the target's mmap_lock (0.3 s at 65k
mappings, while the target's own mmap, munmap and faults wait). With ``full_every`` > 1 most
samples are cheap: /proc/PID/status, whose RSS counters the kernel keeps without the lock; the
last full snapshot stands for the mappings, with the change in anonymous, file and shmem pages put
on the classes that grew between the last two full ones. A full sample is taken every
``full_every`` samples, and as soon as the RSS or the address space's size moved by more than
MOVED since the last full one. While full samples find nothing new (RSS and size within QUIET of
the last one) the gap between them doubles, up to BACKOFF times ``full_every``: a steady process
with 50k mappings costs a read every 80 s instead of every 10, and a change brings the cadence
back at once.

A target that goes away or changes credentials raises TargetGone or AccessDenied from ``take``;
TreeSampler keeps every sample taken before and says why it stopped.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from leakhunt.errors import TargetGone
from leakhunt.gpu import NvmlReader
from leakhunt.proc.cgroup import CgroupReader, CgroupReading, FsUsage, dev_shm_usage
from leakhunt.proc.classes import RegionClass
from leakhunt.proc.growth import GroupKey, GroupStat, groups
from leakhunt.proc.shmem import HeldShm, ShmAccountant, ShmTotals
from leakhunt.proc.smaps import Snapshot, parse_smaps
from leakhunt.proc.target import Target, proc_read, read_status

#: /dev/shm is listed for files nobody maps every this many samples (it may hold thousands).
ORPHANS_EVERY = 10
#: A cheap sample whose RSS moved this much since the last full one (or MOVED_SHARE of it, when
#: more) calls for a full one: the mappings behind the change are worth reading.
MOVED = 8 * 2**20
MOVED_SHARE = 0.02
#: A full sample within this of the last one (RSS and address space) found nothing new: the next
#: comes twice as late, up to BACKOFF times ``full_every`` samples.
QUIET = 2**20
BACKOFF = 8
#: Where a cheap sample puts the change of each status counter: on the class of these that grew
#: most between the last two full samples, else on the first.
COUNTER_CLASSES = {
    "RssAnon": (RegionClass.ANON, RegionClass.HEAP, RegionClass.STACK),
    "RssShmem": (RegionClass.SHM, RegionClass.PINNED),
    "RssFile": (RegionClass.FILE, RegionClass.LIB, RegionClass.GPU, RegionClass.SPECIAL),
}


@dataclass(frozen=True)
class Sample:
    """One look at the target: its full smaps and the totals derived from it."""

    seq: int
    ts: float  # wall clock (time.time())
    t: float  # seconds since the first sample (monotonic)
    pid: int
    snapshot: Snapshot
    status: dict[str, int]  # /proc/PID/status memory fields, bytes
    cost_s: float  # how long reading and parsing took
    classes: dict[RegionClass, int] = field(default_factory=dict)
    groups: dict[GroupKey, GroupStat] = field(default_factory=dict)
    raw: bytes | None = None  # the smaps text, kept only when a recording wants it
    gpu_bytes: int | None = None  # device memory NVML says the process uses (None: not sampled)
    shm: ShmTotals | None = None  # the shared objects it keeps alive, each measured as an object
    cgroup: CgroupReading | None = None  # its memory cgroup, as the kernel charges it
    dev_shm: FsUsage | None = None  # the /dev/shm filesystem it sees
    held: HeldShm | None = None  # every held object (live samples only; recordings keep totals)
    full: bool = True  # False: a cheap sample (status counters; snapshot and groups of the last full one)

    @property
    def rss(self) -> int:
        return sum(self.classes.values())

    def charged(self) -> Snapshot:
        """The snapshot with shared objects counted whole (HeldShm.charge): what the footprint
        is made of, mapping by mapping."""
        return self.held.charge(self.snapshot) if self.held is not None else self.snapshot

    @property
    def footprint(self) -> int:
        """What the process keeps alive: its private pages plus its held shared objects whole
        (RSS counts only the shared pages this process touched)."""
        return footprint(self.rss, self.shm)

    def to_record(self, snapshot_path: str | None = None) -> dict:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "t": self.t,
            "pid": self.pid,
            "rss": self.rss,
            "regions": len(self.snapshot),
            "cost_s": self.cost_s,
            "status": self.status,
            "classes": {c.value: v for c, v in self.classes.items()},
            "groups": [[c.value, path, g.rss, g.regions] for (c, path), g in self.groups.items() if g.rss],
            "snapshot": snapshot_path,
            "full": self.full,
            **({"gpu_bytes": self.gpu_bytes} if self.gpu_bytes is not None else {}),
            **charge_record(self.footprint, self.shm, self.cgroup, self.dev_shm),
        }


def charge_record(
    footprint_bytes: int, shm: ShmTotals | None, cgroup: CgroupReading | None, dev_shm: FsUsage | None
) -> dict:
    """The footprint and the kernel's charges as a sample (or a tree's tick) records them."""
    return {
        "footprint": footprint_bytes,
        **({"held_shm": shm.to_json()} if shm is not None else {}),
        **({"cgroup": cgroup.to_json()} if cgroup is not None else {}),
        **({"dev_shm": dev_shm.to_json()} if dev_shm is not None else {}),
    }


def _counters_rss(status: dict[str, int]) -> int:
    return status.get("RssAnon", 0) + status.get("RssFile", 0) + status.get("RssShmem", 0)


def footprint(rss: int, shm: ShmTotals | None) -> int:
    return rss if shm is None else max(0, rss - shm.rss) + shm.bytes


class History:
    """What a run keeps of its samples: totals and group sizes for every sample, full
    snapshots only of the first and the latest (a big process's snapshot is megabytes).

    Bounded, so that a watch or an exporter left running for days does not grow: past MAX_POINTS
    the older half is thinned to every other point (the first one kept), so the series keep the
    whole run at a resolution that falls with age, and ``samples`` still counts every sample."""

    def __init__(self) -> None:
        self.samples = 0  # every sample added, thinned or not
        self.t: list[float] = []
        self.ts: list[float] = []
        self.rss: list[int] = []
        self.classes: dict[RegionClass, list[int]] = {c: [] for c in RegionClass}
        self.group_rss: list[dict[GroupKey, int]] = []
        self.group_regions: dict[GroupKey, int] = {}
        self.first: Sample | None = None
        self.last: Sample | None = None
        self.cost_s: list[float] = []
        self.gpu: list[int] = []  # device memory per sample, when NVML is sampled
        self.footprint: list[int] = []  # private memory plus held shared objects, per sample
        self.held: list[int] = []  # held shared objects' bytes, per sample
        self.cgroup_usage: list[int] = []  # the memory cgroup's charge, when it was read
        self.dev_shm_used: list[int] = []  # /dev/shm's fill, when it was read
        self.pss: list[int] = []  # PSS and USS (for a tree, summed), per sample
        self.uss: list[int] = []
        self.shm: ShmTotals | None = None  # the latest of each
        self.cgroup: CgroupReading | None = None
        self.dev_shm: FsUsage | None = None
        self.held_objects: HeldShm | None = None

    def add(self, sample: Sample) -> None:
        if self.first is None:
            self.first = sample
        self.last = sample
        self.append(
            sample.t,
            sample.ts,
            sample.rss,
            sample.classes,
            {k: g.rss for k, g in sample.groups.items() if g.rss},
            {k: g.regions for k, g in sample.groups.items()},
            sample.cost_s,
            sample.gpu_bytes,
            sample.shm,
            sample.cgroup,
            sample.dev_shm,
            sample.held,
            sample.snapshot.total("Pss"),
            sample.snapshot.uss(),
        )

    def append(
        self,
        t: float,
        ts: float,
        rss: int,
        classes: dict[RegionClass, int],
        group_rss: dict[GroupKey, int],
        group_regions: dict[GroupKey, int],
        cost_s: float,
        gpu_bytes: int | None = None,
        shm: ShmTotals | None = None,
        cgroup: CgroupReading | None = None,
        dev_shm: FsUsage | None = None,
        held: HeldShm | None = None,
        pss: int | None = None,
        uss: int | None = None,
    ) -> None:
        """Totals of one sample that are not one snapshot's (a process tree's, say)."""
        if pss is not None and uss is not None:
            self.pss.append(pss)
            self.uss.append(uss)
        if gpu_bytes is not None:
            self.gpu.append(gpu_bytes)
        self.footprint.append(footprint(rss, shm))
        self.held.append(shm.bytes if shm is not None else 0)
        if shm is not None:
            self.shm = shm
        if held is not None:
            self.held_objects = held
        if cgroup is not None:
            self.cgroup_usage.append(cgroup.usage_bytes)
            self.cgroup = cgroup
        if dev_shm is not None:
            self.dev_shm_used.append(dev_shm.used_bytes)
            self.dev_shm = dev_shm
        self.t.append(t)
        self.ts.append(ts)
        self.rss.append(rss)
        self.cost_s.append(cost_s)
        for c, series in self.classes.items():
            series.append(classes.get(c, 0))
        self.group_rss.append(group_rss)
        self.group_regions = group_regions
        self.samples += 1
        if len(self.t) > MAX_POINTS:
            self._thin()

    def _series(self) -> list[list]:
        return [
            self.t,
            self.ts,
            self.rss,
            self.cost_s,
            self.group_rss,
            self.footprint,
            self.held,
            self.gpu,
            self.cgroup_usage,
            self.dev_shm_used,
            self.pss,
            self.uss,
            *self.classes.values(),
        ]

    def _thin(self) -> None:
        """Every other point of the older half. Series kept beside every sample are thinned
        alike; the ones kept only when there was a reading (gpu, cgroup) on their own."""
        n = len(self.t)
        for series in self._series():
            if len(series) == n or len(series) > MAX_POINTS:
                half = len(series) // 2
                series[:] = series[:half:2] + series[half:]

    def drop_before(self, t: float) -> None:
        """Forget the points older than ``t`` (a sliding window: the exporter's slopes). Series
        kept only when there was a reading keep at most as many points as remain."""
        k = bisect.bisect_left(self.t, t)
        if not k:
            return
        n = len(self.t)
        for series in self._series():
            if len(series) == n:
                del series[:k]
            elif len(series) > n - k:
                del series[: len(series) - (n - k)]
        self.samples = max(len(self.t), self.samples - k)

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


#: Points a History keeps of each series before it thins the older half (a day at 1 Hz in 4k).
MAX_POINTS = 4096

STOP_DURATION = "duration reached"
STOP_INTERRUPTED = "interrupted"
STOP_REQUESTED = "stopped"


class Pace:
    """Iterate at a fixed interval until ``duration`` elapsed or ``stop`` is set; ``reason`` says
    which. A slow iteration skips ahead rather than firing a burst to catch up.

    ``idle(timeout)``, when given, does the other work of the loop between iterations (polling a
    tracer): it is called until the next iteration is due, and at least once between any two,
    even when an iteration overran its interval, so that neither side starves the other.
    """

    def __init__(
        self,
        interval: float,
        duration: float | None,
        stop: threading.Event | None = None,
        idle: Callable[[float], object] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self.duration = duration
        self.stop = stop or threading.Event()
        self.idle = idle
        self.reason = STOP_DURATION

    def __iter__(self) -> Iterator[None]:
        now = time.monotonic()
        deadline = None if self.duration is None else now + self.duration
        next_at = now
        while True:
            yield
            next_at += self.interval
            now = time.monotonic()
            if deadline is not None and max(next_at, now) > deadline + 1e-3:
                return
            if self.idle is None:
                next_at = max(next_at, now)
                if self.stop.wait(next_at - now):
                    self.reason = STOP_REQUESTED
                    return
                continue
            self.idle(max(0.0, next_at - now))
            while not self.stop.is_set() and (now := time.monotonic()) < next_at:
                self.idle(next_at - now)
            if self.stop.is_set():
                self.reason = STOP_REQUESTED
                return
            next_at = max(next_at, time.monotonic())


class Sampler:
    """Takes samples of one target at a fixed interval."""

    def __init__(
        self,
        target: Target,
        interval: float = 1.0,
        keep_raw: bool = False,
        t0: float | None = None,
        gpu: NvmlReader | None = None,
        full_every: int = 1,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        if full_every < 1:
            raise ValueError("full_every must be at least 1")
        self.target = target
        self.interval = interval
        self.full_every = full_every
        self._gap = full_every  # samples between full ones now (backs off while nothing changes)
        self._full: list[Sample] = []  # the last two full samples
        self.full_samples = 0
        self.keep_raw = keep_raw
        self._t0 = t0  # the clock's zero; a tree's samplers share one
        self._seq = 0
        self.gpu = gpu
        self.shm = ShmAccountant(target.pid)
        self.cgroup = CgroupReader(target.pid)
        self._orphans: tuple = ()

    def take(self) -> Sample:
        """One sample now: cheap or full, as ``full_every`` and the RSS say. Raises TargetGone or
        AccessDenied."""
        if self.full_every == 1 or not self._full:
            return self._take_full()
        began = time.monotonic()
        status = read_status(self.target.pid)
        last = self._full[-1]
        rss = _counters_rss(status) + last.rss - _counters_rss(last.status)
        moved = max(MOVED, MOVED_SHARE * last.rss)
        # The address space's size too: shared objects mapped but never touched (held memfds,
        # /dev/shm segments) grow the footprint with no RSS.
        mapped = status.get("VmSize", 0) - last.status.get("VmSize", 0)
        if self._seq - last.seq >= self._gap or abs(rss - last.rss) > moved or abs(mapped) > moved:
            return self._take_full()
        return self._take_cheap(began, status, last)

    def _take_cheap(self, began: float, status: dict[str, int], last: Sample) -> Sample:
        pid = self.target.pid
        classes = dict(last.classes)
        for counter, candidates in COUNTER_CLASSES.items():
            klass = self._grower(candidates)
            classes[klass] = classes.get(klass, 0) + status.get(counter, 0) - last.status.get(counter, 0)
        sample = Sample(
            self._seq,
            time.time(),
            began - self._t0,
            pid,
            last.snapshot,
            status,
            time.monotonic() - began,
            classes,
            last.groups,
            None,
            self.gpu.used_by({pid})[pid] if self.gpu is not None else None,
            last.shm,
            self.cgroup.read(),
            dev_shm_usage(pid),
            last.held,
            full=False,
        )
        self._seq += 1
        return sample

    def _grower(self, candidates: tuple[RegionClass, ...]) -> RegionClass:
        """Of ``candidates``, the class that grew most between the last two full samples."""
        if len(self._full) < 2:
            return candidates[0]
        a, b = self._full[0].classes, self._full[1].classes
        growth = {c: b.get(c, 0) - a.get(c, 0) for c in candidates}
        best = max(candidates, key=lambda c: growth[c])
        return best if growth[best] > 0 else candidates[0]

    def _take_full(self) -> Sample:
        pid = self.target.pid
        began = time.monotonic()
        if self._t0 is None:
            self._t0 = began
        raw = proc_read(pid, "smaps")
        snapshot = parse_smaps(raw, source=f"/proc/{pid}/smaps")
        status = read_status(pid)
        if not len(snapshot) and not self.target.alive():
            raise TargetGone(pid, f"process {pid} exited")
        gpu_bytes = self.gpu.used_by({pid})[pid] if self.gpu is not None else None
        held = self.shm.measure(snapshot, orphans=self._seq % ORPHANS_EVERY == 0)
        if self._seq % ORPHANS_EVERY == 0:
            self._orphans = held.orphans
        else:
            held = replace(held, orphans=self._orphans)
        cgroup = self.cgroup.read()
        dev_shm = dev_shm_usage(pid)
        cost = time.monotonic() - began
        sample = Sample(
            self._seq,
            time.time(),
            began - self._t0,
            pid,
            snapshot,
            status,
            cost,
            snapshot.class_totals(),
            groups(snapshot),
            raw if self.keep_raw else None,
            gpu_bytes,
            held.totals(),
            cgroup,
            dev_shm,
            held,
        )
        self._seq += 1
        if self._full and self.full_every > 1:
            before = self._full[-1].status
            quiet = all(abs(status.get(k, 0) - before.get(k, 0)) <= QUIET for k in ("VmRSS", "VmSize"))
            self._gap = min(self._gap * 2, self.full_every * BACKOFF) if quiet else self.full_every
        self._full = [*self._full[-1:], sample]
        self.full_samples += 1
        return sample
