"""A recording read back for a report: the sample history rebuilt from samples.jsonl, the memory
summary every command renders, and whatever other streams the session holds (Python heap,
tracer ledger, correlator culprits), each None or empty when the recording lacks it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from leakhunt.analysis.correlate import Attribution
from leakhunt.analysis.summary import MemorySummary, summarize
from leakhunt.analysis.verdict import MIN_SLOPE
from leakhunt.errors import BadInput, CorruptRecording
from leakhunt.heap import HeapSeries, read_heap
from leakhunt.proc.cgroup import CgroupReading, FsUsage
from leakhunt.proc.classes import RegionClass
from leakhunt.proc.growth import GroupStat
from leakhunt.proc.sampler import History, Sample
from leakhunt.proc.shmem import ShmTotals
from leakhunt.proc.smaps import Snapshot, parse_smaps
from leakhunt.record import EVENTS, TREE, Recording
from leakhunt.report.streams import (
    CallerSeries,
    TracerTotals,
    read_attribution,
    read_callers,
    read_event_counts,
    read_tracer_totals,
)

_CLASS_NAMES = {c.value for c in RegionClass}


@dataclass(frozen=True)
class ProcessLine:
    """One process of a recording that followed a tree (watch --subprocesses)."""

    pid: int
    samples: int
    first_rss: int
    last_rss: int
    duration_s: float
    slope: float  # bytes/s, NaN with too few samples
    verdict: str  # "leak", "plateau" or ""


@dataclass(frozen=True)
class ReportData:
    recording: Recording
    history: History
    memory: MemorySummary | None  # None when the recording has no sample at all
    heap: HeapSeries | None
    attribution: Attribution | None  # the correlator's last word (investigate recordings)
    callers: CallerSeries | None
    tracer: TracerTotals | None
    event_counts: dict[str, int]  # mmap/munmap/... events recorded, by kind
    notes: tuple[str, ...]
    problems: tuple[str, ...]  # what was wrong with the recording itself
    processes: tuple[ProcessLine, ...] = ()  # every pid sampled, when more than one was

    @property
    def session(self) -> dict:
        return self.recording.session

    @property
    def has_tracer_data(self) -> bool:
        return (
            bool(self.event_counts)
            or self.callers is not None
            or self.attribution is not None
            or self.tracer is not None
        )

    @property
    def target_died(self) -> bool:
        summary = self.recording.summary or {}
        return is_exit_note(str(summary.get("stopped_because", ""))) or any(map(is_exit_note, self.notes))


def is_exit_note(text: str) -> bool:
    """Whether a note or stop reason says the target went away (TargetGone's messages)."""
    return "exited" in text or "no process with pid" in text


def load(directory: str | Path) -> ReportData:
    rec = Recording.open(directory)
    tree = list(rec.records(TREE))
    # A process tree's story is its totals (watch --subprocesses records them as the tree stream);
    # each process gets its own line in the processes section.
    history, problems = (_tree_history(rec, tree), []) if tree else replay(rec)
    judge = {
        "warmup_s": (rec.summary or {}).get("warmup_s"),
        "min_slope": rec.session.get("max_slope_bytes_per_s") or MIN_SLOPE,
    }
    memory = summarize(history, **judge) if len(history) else None
    notes = tuple(str(n.get("note", "")) for n in rec.notes() if n.get("note") != "joined")
    # Every other stream's timestamps are placed on the sample timeline by subtracting t0.
    t0 = history.ts[0] - history.t[0] if len(history) else None
    data = ReportData(
        rec,
        history,
        memory,
        read_heap(rec, t0),
        read_attribution(rec),
        read_callers(rec, t0),
        read_tracer_totals(rec),
        read_event_counts(rec, EVENTS),
        notes,
        (),
        _processes(rec, judge),
    )
    return dataclasses.replace(data, problems=tuple(problems + rec.problems))


def _tree_history(rec: Recording, records: list[dict]) -> History:
    empty = parse_smaps(b"")
    history = History()
    pid = rec.session.get("pid", 0)
    for i, r in enumerate(records):
        classes = {RegionClass(k): int(v) for k, v in r.get("classes", {}).items() if k in _CLASS_NAMES}
        history.add(
            Sample(
                i, r["ts"], r["t"], pid, empty, {}, 0.0, classes, {}, gpu_bytes=_gpu_bytes(r), **_charges(r)
            )
        )
    return history


def _processes(rec: Recording, judge: dict) -> tuple[ProcessLine, ...]:
    pids = rec.pids()
    if len(pids) < 2:
        return ()
    lines = []
    for pid in pids:
        history, _ = replay(rec, pid, snapshots=False)
        if not len(history):
            continue
        v = summarize(history, **judge).verdict
        lines.append(
            ProcessLine(
                pid,
                len(history),
                history.rss[0],
                history.rss[-1],
                history.duration_s,
                v.trend.slope,
                "leak" if v.leak else "plateau" if v.plateau else "",
            )
        )
    return tuple(lines)


def replay(rec: Recording, pid: int | None = None, snapshots: bool = True) -> tuple[History, list[str]]:
    """The History a live run would have had, from recorded samples. Full snapshots exist only
    for some samples: the first and the latest recorded ones stand in for the history's first
    and last (they are what address-range growth is computed from)."""
    problems: list[str] = []
    records = rec.samples(pid)  # default: the session's process (the root of a tree)
    snapshot_paths = [(seq, rel) for seq, _, rel in rec.snapshot_index(pid)] if snapshots else []
    empty = parse_smaps(b"")
    history = History()
    unknown: set[str] = set()
    for r in records:
        history.add(_sample(r, empty, unknown))
    if unknown:
        problems.append(f"unknown region classes skipped: {', '.join(sorted(unknown))}")
    if len(history) and snapshot_paths:
        first_seq, first_rel = min(snapshot_paths)
        last_seq, last_rel = max(snapshot_paths)
        if first_seq == history.first.seq and last_seq > first_seq:
            try:
                history.first = dataclasses.replace(history.first, snapshot=_load(rec, first_rel))
                if history.last.seq != last_seq:
                    problems.append(f"address ranges are as of sample {last_seq}, the last with a snapshot")
                history.last = dataclasses.replace(history.last, snapshot=_load(rec, last_rel))
            except CorruptRecording as e:
                problems.append(str(e))
    return history, problems


def _load(rec: Recording, rel: str) -> Snapshot:
    try:
        return parse_smaps(rec.snapshot_text(rel), source=rel)
    except BadInput as e:  # a damaged snapshot: the rest of the recording still renders
        raise CorruptRecording(str(e)) from None


def _sample(r: dict, empty: Snapshot, unknown: set[str]) -> Sample:
    classes: dict[RegionClass, int] = {}
    for name, value in r.get("classes", {}).items():
        try:
            classes[RegionClass(name)] = int(value)
        except ValueError:
            unknown.add(name)
    groups = {}
    for klass, path, rss, regions in r.get("groups", []):
        try:
            groups[(RegionClass(klass), path)] = GroupStat(int(rss), int(regions), 0, 0)
        except ValueError:
            unknown.add(klass)
    return Sample(
        r["seq"],
        r["ts"],
        r["t"],
        r.get("pid", 0),
        empty,
        r.get("status", {}),
        r.get("cost_s", 0.0),
        classes,
        groups,
        gpu_bytes=_gpu_bytes(r),
        **_charges(r),
    )


def _charges(r: dict) -> dict:
    """Held shared memory, the memory cgroup and /dev/shm of a sample record (absent in
    recordings made before leakhunt measured them: their footprint is their RSS)."""
    return {
        "shm": ShmTotals.from_json(r.get("held_shm")),
        "cgroup": CgroupReading.from_json(r.get("cgroup")),
        "dev_shm": FsUsage.from_json(r.get("dev_shm")),
    }


def _gpu_bytes(r: dict) -> int | None:
    """Device memory of a sample record (NVML), None when it was not sampled."""
    value = r.get("gpu_bytes")
    return int(value) if isinstance(value, (int, float)) else None
