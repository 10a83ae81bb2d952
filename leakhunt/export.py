"""Prometheus metrics for a fleet: every watched process's RSS by class, its slopes over a rolling
window, its verdict and its top growing groups, and its device memory (NVML) with its own slope
and verdict where there is a GPU, served over HTTP for Prometheus to scrape.

One exporter runs per node; Prometheus does the scale. Targets are explicit pids and/or every
process whose command line matches a pattern, re-discovered each interval, so processes that
come and go (restarts, autoscaling) are followed. With ``subprocesses`` every process under an
explicit pid is a target too, and each such tree gets its own totals (shared memory counted
once). Sampling and judging happen in one background thread; a scrape only reads the latest
figures under a lock.

The exporter does not sample through proc.tree.TreeSampler as watch, investigate and ci do: it
keeps a rolling window and no snapshot per process (hundreds of matched processes, for weeks),
where a TreeSampler keeps a run's whole history and its first and last snapshots. It shares the
tree's parts: children come from proc.tree.descendants, a tree's totals from tree_totals.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from leakhunt.analysis.device import open_nvml
from leakhunt.analysis.summary import MemorySummary, summarize
from leakhunt.errors import AccessDenied, TargetGone
from leakhunt.gpu import NvmlReader
from leakhunt.proc.sampler import History, Pace, Sample, Sampler
from leakhunt.proc.smaps import parse_smaps
from leakhunt.proc.target import PROC, Target, open_target
from leakhunt.proc.tree import descendants, tree_totals
from leakhunt.report.streams import last_ledger_callers

PREFIX = "leakhunt"
#: (pid) -> [(caller, outstanding bytes)]: filled once a tracer runs beside the exporter.
CulpritSource = Callable[[int], Iterable[tuple[str, int]]]


@dataclass
class Watched:
    target: Target
    sampler: Sampler
    history: History = field(default_factory=History)  # the last --window of samples
    last: Sample | None = None  # the latest sample, its snapshot dropped
    summary: MemorySummary | None = None
    last_cost_s: float = 0.0
    root: int | None = None  # with subprocesses: the explicit pid this process is under


@dataclass(frozen=True)
class TreeFigures:
    """A process tree's memory at the last tick: every shared object counted once (RSS), and the
    sums of PSS and USS."""

    root: Target
    rss: int
    pss: int
    uss: int
    processes: int


@dataclass(frozen=True)
class FleetView:
    """What one scrape sees: an immutable copy of the fleet's latest figures."""

    targets: tuple[
        tuple[Target, MemorySummary | None, Sample, float, float], ...
    ]  # target, summary, last, window, cost
    lost_total: int
    discovered_total: int
    trees: tuple[TreeFigures, ...] = ()
    roots: dict[int, int] = field(default_factory=dict)  # pid -> the root of its tree (subprocesses)


class TickDevice:
    """NVML read once per exporter tick for every watched pid (one sweep of the GPUs' process
    lists, not one per process); each Sampler then reads its own pid from it."""

    def __init__(self, reader: NvmlReader) -> None:
        self.reader = reader
        self._used: dict[int, int] = {}

    def refresh(self, pids: Iterable[int]) -> None:
        self._used = self.reader.used_by(set(pids))

    def used_by(self, pids: set[int]) -> dict[int, int]:
        return {pid: self._used.get(pid, 0) for pid in pids}

    def close(self) -> None:
        self.reader.close()


class Fleet:
    """The processes an exporter follows, each with a rolling window of light samples."""

    def __init__(
        self,
        pids: Iterable[int] = (),
        match: str | None = None,
        interval: float = 5.0,
        window_s: float = 900.0,
        culprits: CulpritSource | None = None,
        device: bool = True,
        subprocesses: bool = False,
        full_every: int = 1,
    ) -> None:
        self.interval = interval
        self.full_every = full_every
        self.subprocesses = subprocesses
        self._trees: tuple[TreeFigures, ...] = ()
        self.window_s = window_s
        self.match = re.compile(match) if match else None
        self.culprits = culprits
        self._explicit = [open_target(p) for p in pids]  # a bad --pid is an error at the start
        self._watched: dict[tuple[int, int], Watched] = {}
        self._ignored = _ancestors(os.getpid())  # never export ourselves or our shell
        self._lock = threading.Lock()
        self._view = FleetView((), 0, 0)
        self._lost = 0
        self._discovered = 0
        self._empty = parse_smaps(b"")
        reader, self.device_unavailable = open_nvml() if device else (None, "not sampled (--no-device)")
        self.device = TickDevice(reader) if reader else None

    # -- discovery ---------------------------------------------------------------------------

    def _candidates(self) -> Iterator[Target]:
        yield from (t for t in self._explicit if t.alive())
        if self.match is None:
            return
        # A watched pid is not opened again each interval (open_target reads four /proc files);
        # sample_once notices when it exits, or when the pid now belongs to another process.
        skip = self._ignored | {pid for pid, _ in self._watched}
        for name in os.listdir(PROC):
            if not name.isdigit() or int(name) in skip:
                continue
            try:
                cmdline = (PROC / name / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmdline and self.match.search(cmdline):
                try:
                    yield open_target(int(name))
                except (TargetGone, AccessDenied):
                    continue

    def _descendants(self) -> Iterator[tuple[Target, int]]:
        """Every process under the explicit pids, with the pid of the tree it belongs to."""
        watched = {pid for pid, _ in self._watched}
        for root in self._explicit:
            for child in descendants(root.pid):
                if child in watched or child in self._ignored:
                    continue
                try:
                    yield open_target(child), root.pid
                except (TargetGone, AccessDenied):
                    continue

    def discover(self) -> None:
        found = [
            (t, t.pid if self.subprocesses and t in self._explicit else None) for t in self._candidates()
        ]
        if self.subprocesses:
            found += list(self._descendants())
        for target, root in found:
            key = (target.pid, target.start_time)
            if key not in self._watched:
                self._watched[key] = Watched(
                    target,
                    Sampler(target, self.interval, gpu=self.device, full_every=self.full_every),
                    root=root,
                )
                self._discovered += 1

    # -- sampling ----------------------------------------------------------------------------

    def sample_once(self) -> None:
        self.discover()
        if self.device is not None:
            self.device.refresh(pid for pid, _ in self._watched)
        members: dict[int, list] = {}  # root pid -> this tick's snapshots of its tree
        for key, w in list(self._watched.items()):
            try:
                if not w.target.alive():  # exited, or its pid was reused by another process
                    raise TargetGone(w.target.pid)
                sample = w.sampler.take()
            except (TargetGone, AccessDenied):
                del self._watched[key]
                self._lost += 1
                continue
            w.last_cost_s = sample.cost_s
            if w.root is not None:
                members.setdefault(w.root, []).append(sample.snapshot)
            # The window keeps totals and group sizes only (History): a big process's snapshot is
            # megabytes, and even its groups' stats are kilobytes a sample.
            w.last = replace(sample, snapshot=self._empty)
            w.history.add(w.last)
            w.history.drop_before(sample.t - self.window_s)
            w.summary = summarize(w.history) if len(w.history) >= 2 else None
        self._trees = tuple(
            _tree_figures(root, members.get(root.pid, [])) for root in self._explicit if root.pid in members
        )
        self._publish()

    def _publish(self) -> None:
        rows = tuple(
            (w.target, w.summary, w.last, w.history.duration_s, w.last_cost_s)
            for w in self._watched.values()
            if w.last is not None
        )
        roots = {w.target.pid: w.root for w in self._watched.values() if w.root is not None}
        with self._lock:
            self._view = FleetView(rows, self._lost, self._discovered, self._trees, roots)

    def view(self) -> FleetView:
        with self._lock:
            return self._view

    def run(self, stop: threading.Event, duration: float | None = None) -> None:
        for _ in Pace(self.interval, duration, stop):
            self.sample_once()

    def close(self) -> None:
        if self.device is not None:
            self.device.close()


def _tree_figures(root: Target, snapshots: list) -> TreeFigures:
    totals = tree_totals(snapshots)
    return TreeFigures(root, totals.rss, totals.pss, totals.uss, len(snapshots))


def _ancestors(pid: int) -> set[int]:
    seen = {pid}
    while pid > 1:
        try:
            stat = (PROC / str(pid) / "stat").read_text()
            pid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError):
            break
        seen.add(pid)
    return seen


class FleetCollector(Collector):
    """Turns the fleet's latest view into metric families at scrape time."""

    def __init__(self, fleet: Fleet, top_groups: int = 5) -> None:
        self.fleet = fleet
        self.top_groups = top_groups

    def collect(self) -> Iterator:
        view = self.fleet.view()
        proc = ["pid", "comm"]
        rss = GaugeMetricFamily(
            f"{PREFIX}_rss_bytes", "Resident memory by region class", labels=proc + ["class"]
        )
        total = GaugeMetricFamily(
            f"{PREFIX}_process_rss_bytes", "Resident memory of the process", labels=proc
        )
        slope = GaugeMetricFamily(
            f"{PREFIX}_rss_slope_bytes_per_second",
            "Theil-Sen slope of RSS over the window ('total' or a region class), with "
            "its 95% interval bounds",
            labels=proc + ["class", "bound"],
        )
        leak = GaugeMetricFamily(
            f"{PREFIX}_leak",
            "1 when the series is judged a leak (significant, still growing), else 0",
            labels=proc + ["class"],
        )
        plateau = GaugeMetricFamily(
            f"{PREFIX}_plateau", "1 when the series grew and levelled off", labels=proc + ["class"]
        )
        group_rss = GaugeMetricFamily(
            f"{PREFIX}_group_rss_bytes",
            "RSS of the top growing (class, path) groups",
            labels=proc + ["class", "path"],
        )
        group_growth = GaugeMetricFamily(
            f"{PREFIX}_group_growth_bytes",
            "Growth over the window of the top growing groups",
            labels=proc + ["class", "path"],
        )
        culprit = GaugeMetricFamily(
            f"{PREFIX}_culprit_outstanding_bytes",
            "Bytes mapped and not unmapped, by caller (when a tracer runs beside the exporter)",
            labels=proc + ["caller"],
        )
        window = GaugeMetricFamily(
            f"{PREFIX}_window_seconds", "Span of the samples the slopes are fitted on", labels=proc
        )
        cost = GaugeMetricFamily(
            f"{PREFIX}_sample_duration_seconds", "Time the last smaps sample took", labels=proc
        )
        device = DeviceFamilies(proc)
        charges = ChargeFamilies(proc)
        for target, summary, last, span, sample_cost in view.targets:
            who = [str(target.pid), target.comm]
            total.add_metric(who, last.rss)
            for klass, value in last.classes.items():
                rss.add_metric(who + [klass.value], value)
            window.add_metric(who, span)
            cost.add_metric(who, sample_cost)
            if summary is not None:
                _judged(summary, who, slope, leak, plateau)
                for g in summary.groups[: self.top_groups]:
                    group_rss.add_metric(who + [g.klass.value, g.label], g.end)
                    group_growth.add_metric(who + [g.klass.value, g.label], g.growth)
            if self.fleet.culprits is not None:
                for caller, n in self.fleet.culprits(target.pid):
                    culprit.add_metric(who + [caller], n)
            device.add(who, last, summary)
            charges.add(who, last, summary)
        yield from (rss, total, slope, leak, plateau, group_rss, group_growth, culprit, window, cost)
        yield from device.families()
        yield from charges.families()
        if self.fleet.subprocesses:
            yield from _tree_families(view)
        yield GaugeMetricFamily(
            f"{PREFIX}_device_memory_sampled",
            "1 when NVML works here and device memory is "
            "sampled; 0 without an NVIDIA driver, GPU or nvidia-ml-py",
            value=float(self.fleet.device is not None),
        )
        yield GaugeMetricFamily(f"{PREFIX}_targets", "Processes being watched", value=len(view.targets))
        yield CounterMetricFamily(
            f"{PREFIX}_targets_lost", "Watched processes that exited", value=view.lost_total
        )
        yield CounterMetricFamily(
            f"{PREFIX}_targets_discovered", "Processes ever watched", value=view.discovered_total
        )


def _tree_families(view: FleetView) -> Iterator:
    """--subprocesses: which tree each process belongs to, and each tree's own totals."""
    member = GaugeMetricFamily(
        f"{PREFIX}_process_tree",
        "1 for each watched process of a tree: the pid it "
        "is under (root) and its own pid (join on pid for the per-process series)",
        labels=["pid", "comm", "root"],
    )
    for target, *_ in view.targets:
        if target.pid in view.roots:
            member.add_metric([str(target.pid), target.comm, str(view.roots[target.pid])], 1.0)
    who = ["pid", "comm"]
    rss = GaugeMetricFamily(
        f"{PREFIX}_tree_rss_bytes",
        "Resident memory of the process and every process under "
        "it, each shared object (a /dev/shm segment, a library) counted once",
        labels=who,
    )
    pss = GaugeMetricFamily(
        f"{PREFIX}_tree_pss_bytes", "Sum of the tree's proportional set sizes", labels=who
    )
    uss = GaugeMetricFamily(
        f"{PREFIX}_tree_uss_bytes", "Sum of the tree's unique (private) set sizes", labels=who
    )
    count = GaugeMetricFamily(
        f"{PREFIX}_tree_processes", "Processes in the tree at the last sample", labels=who
    )
    for tree in view.trees:
        labels = [str(tree.root.pid), tree.root.comm]
        for family, value in ((rss, tree.rss), (pss, tree.pss), (uss, tree.uss), (count, tree.processes)):
            family.add_metric(labels, value)
    yield from (member, rss, pss, uss, count)


def _bounds(family: GaugeMetricFamily, who: list[str], v) -> None:
    for bound, value in (("estimate", v.trend.slope), ("lower", v.trend.lo), ("upper", v.trend.hi)):
        if value == value:  # NaN: not enough samples yet; absent beats a fake zero
            family.add_metric(who + [bound], value)


def _judged(summary: MemorySummary, who: list[str], slope, leak, plateau) -> None:
    series = [("total", summary.rss)] + [(k.value, s) for k, s in summary.classes.items()]
    for name, s in series:
        v = s.verdict
        _bounds(slope, who + [name], v)
        leak.add_metric(who + [name], float(v.leak))
        plateau.add_metric(who + [name], float(v.plateau))


class DeviceFamilies:
    """Device memory (NVML) per process: its bytes, its slope over the window with the 95% bounds,
    and its verdict. A series beside the region classes, not one of them: a GPU leak leaves RSS
    flat, so it has families of its own (absent for processes NVML was not asked about)."""

    def __init__(self, proc: list[str]) -> None:
        self.bytes = GaugeMetricFamily(
            f"{PREFIX}_device_memory_bytes",
            "GPU memory the process uses (NVML, summed over its GPUs)",
            labels=proc,
        )
        self.slope = GaugeMetricFamily(
            f"{PREFIX}_device_memory_slope_bytes_per_second",
            "Theil-Sen slope of device memory over the window, with its 95% interval bounds",
            labels=proc + ["bound"],
        )
        self.leak = GaugeMetricFamily(
            f"{PREFIX}_device_memory_leak",
            "1 when device memory is judged a leak (significant, still growing), else 0",
            labels=proc,
        )
        self.plateau = GaugeMetricFamily(
            f"{PREFIX}_device_memory_plateau", "1 when device memory grew and levelled off", labels=proc
        )

    def add(self, who: list[str], last: Sample, summary: MemorySummary | None) -> None:
        if last.gpu_bytes is None:
            return
        self.bytes.add_metric(who, last.gpu_bytes)
        if summary is None or summary.device is None:
            return
        v = summary.device.verdict
        _bounds(self.slope, who, v)
        self.leak.add_metric(who, float(v.leak))
        self.plateau.add_metric(who, float(v.plateau))

    def families(self) -> tuple:
        return (self.bytes, self.slope, self.leak, self.plateau)


class ChargeFamilies:
    """What the kernel charges beyond RSS: the footprint the verdict runs on (private memory plus
    held shared objects), the held shared memory itself, the memory cgroup and /dev/shm."""

    def __init__(self, proc: list[str]) -> None:
        g = GaugeMetricFamily
        self.footprint = g(
            f"{PREFIX}_footprint_bytes",
            "Private memory plus the shared objects the process keeps alive, each whole (what the verdict judges)",
            labels=proc,
        )
        self.slope = g(
            f"{PREFIX}_footprint_slope_bytes_per_second",
            "Theil-Sen slope of the footprint over the window, with its 95% interval bounds",
            labels=proc + ["bound"],
        )
        self.leak = g(
            f"{PREFIX}_footprint_leak", "1 when the footprint is judged a leak, else 0", labels=proc
        )
        self.held = g(
            f"{PREFIX}_held_shm_bytes",
            "Pages of the tmpfs objects (/dev/shm, memfd, SysV, shared anonymous) the process maps, each once",
            labels=proc,
        )
        self.objects = g(
            f"{PREFIX}_held_shm_objects",
            "Shared objects the process maps ('all'), and those with no name left ('deleted')",
            labels=proc + ["state"],
        )
        self.orphans = g(
            f"{PREFIX}_dev_shm_unmapped_bytes",
            "Bytes of /dev/shm files the process does not map (orphans when nobody does)",
            labels=proc,
        )
        cg = proc + ["cgroup"]
        self.cg_usage = g(f"{PREFIX}_cgroup_usage_bytes", "The memory cgroup's charge", labels=cg)
        self.cg_limit = g(f"{PREFIX}_cgroup_limit_bytes", "The memory cgroup's effective limit", labels=cg)
        self.cg_stat = g(
            f"{PREFIX}_cgroup_stat_bytes",
            "The charge by kind (anon, file, shmem, kernel)",
            labels=cg + ["kind"],
        )
        self.cg_oom = g(f"{PREFIX}_cgroup_oom_kills", "OOM kills the memory cgroup has seen", labels=cg)
        self.cg_eta = g(
            f"{PREFIX}_cgroup_time_to_limit_seconds",
            "Seconds until the charge reaches the limit at its slope (absent: not growing, or no limit)",
            labels=cg,
        )
        self.shm_used = g(
            f"{PREFIX}_dev_shm_used_bytes", "Bytes used in /dev/shm as the process sees it", labels=proc
        )
        self.shm_size = g(
            f"{PREFIX}_dev_shm_size_bytes", "Size of /dev/shm as the process sees it", labels=proc
        )

    def add(self, who: list[str], last: Sample, summary: MemorySummary | None) -> None:
        self.footprint.add_metric(who, last.footprint)
        if last.shm is not None:
            self.held.add_metric(who, last.shm.bytes)
            self.objects.add_metric(who + ["all"], last.shm.objects)
            self.objects.add_metric(who + ["deleted"], last.shm.deleted_objects)
            self.orphans.add_metric(who, last.shm.orphan_bytes)
        if summary is not None:
            _bounds(self.slope, who, summary.verdict)
            self.leak.add_metric(who, float(summary.leak))
        if last.cgroup is not None:
            c = last.cgroup
            labels = who + [c.path]
            self.cg_usage.add_metric(labels, c.usage_bytes)
            if c.limit_bytes is not None:
                self.cg_limit.add_metric(labels, c.limit_bytes)
            for kind, value in c.stat.items():
                self.cg_stat.add_metric(labels + [kind], value)
            if c.oom_kills is not None:
                self.cg_oom.add_metric(labels, c.oom_kills)
            eta = summary.cgroup_charge.time_to_limit_s if summary and summary.cgroup_charge else None
            if eta is not None:
                self.cg_eta.add_metric(labels, eta)
        if last.dev_shm is not None:
            self.shm_used.add_metric(who, last.dev_shm.used_bytes)
            self.shm_size.add_metric(who, last.dev_shm.size_bytes)

    def families(self) -> tuple:
        return (
            self.footprint,
            self.slope,
            self.leak,
            self.held,
            self.objects,
            self.orphans,
            self.cg_usage,
            self.cg_limit,
            self.cg_stat,
            self.cg_oom,
            self.cg_eta,
            self.shm_used,
            self.shm_size,
        )


class LedgerFeed:
    """Culprits' outstanding bytes for the exporter from trace-mmap recordings written beside it
    (``leakhunt trace-mmap --pid PID --record DIR``): the newest ledger record of the recording
    whose session is that pid."""

    def __init__(self, directories: Iterable[str | os.PathLike]) -> None:
        self.directories = [Path(d) for d in directories]

    def _session_pid(self, directory: Path) -> int | None:
        try:
            return json.loads((directory / "session.json").read_text()).get("pid")
        except (OSError, ValueError):
            return None

    def __call__(self, pid: int) -> list[tuple[str, int]]:
        for directory in self.directories:
            if self._session_pid(directory) == pid:
                return [(caller, n) for caller, n in last_ledger_callers(directory) if n > 0]
        return []


def registry_for(fleet: Fleet, top_groups: int = 5) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet, top_groups))
    return registry
