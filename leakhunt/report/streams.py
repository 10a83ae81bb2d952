"""Readers of the tracer and correlator streams a recording may hold, normalised to the plain
records the report draws. The one place that knows their on-disk shape:

``ledger.jsonl`` (trace-mmap --record): periodic outstanding bytes by caller::

    {"ts": 1716.2, "callers": [{"caller": "libleakpool.so!lkpool_grow+0x4c", "bytes": 8388608,
                                "mappings": 8}, ...]}

``verdict.jsonl`` or ``attribution.jsonl`` (investigate; the last record counts), or an
"attribution" object (or a "culprits" list) in summary.json: analysis/correlate.py's
``Attribution.to_json()``::

    {"growth_bytes": 123, "explained_fraction": 0.95, "unexplained_bytes": 6, "verdict": "93% of ...",
     "culprits": [{"library": "libucm.so", "symbol": "ucm_orig_mmap_syscall", "bytes": 117,
                   "slope_bytes_per_s": 4.0, "share": 0.93, "evidence": "traced mmap",
                   "stack": ["frame", ...], "stack_partial": true,
                   "known": {"name": ..., "explanation": ...}, "remedies": ["UCX_MEM_MMAP_HOOK_MODE=none"]}]}

Unknown keys are ignored and missing ones default, so that the report survives the streams'
shapes growing.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leakhunt.record import Recording
from leakhunt.trace.events import Stack

LEDGER = "ledger"
VERDICT_STREAMS = ("verdict", "attribution")


@dataclass(frozen=True)
class Culprit:
    label: str  # who: library!symbol, or the caller frame
    bytes: int  # outstanding bytes it explains
    slope: float  # bytes/s, NaN when unknown
    explained_fraction: float  # of the total anonymous growth, NaN when unknown
    stack: tuple[str, ...]  # frames innermost first, as text
    stack_partial: bool
    remedies: tuple[str, ...]
    explanation: str = ""  # what the known culprit is, when it is a known one
    evidence: str = ""  # how it was found: "traced mmap", "shm segment names", ...


@dataclass(frozen=True)
class Culprits:
    culprits: tuple[Culprit, ...]
    explained_fraction: float  # of all growth, NaN when unknown
    unexplained_bytes: float = float("nan")
    sentence: str = ""  # the correlator's one-line verdict


@dataclass(frozen=True)
class CallerSeries:
    """Outstanding bytes of the top callers over time: ``bytes[i][j]`` is caller j at time t[i]."""

    t: np.ndarray
    callers: tuple[str, ...]
    bytes: np.ndarray


def _float(value, default=float("nan")) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _stack_lines(raw) -> tuple[tuple[str, ...], bool]:
    if isinstance(raw, dict):
        stack = Stack.from_record(raw)
        return tuple(str(f) for f in stack.frames), stack.partial
    if isinstance(raw, list):
        return tuple(str(f) for f in raw), False
    if isinstance(raw, str):
        return tuple(part.strip() for part in raw.split("<-")), False
    return (), True


def _remedy_text(raw) -> str:
    if isinstance(raw, dict):
        parts = [str(raw[k]) for k in ("title", "fix", "text", "env", "command") if raw.get(k)]
        return " — ".join(parts)
    return str(raw)


def _culprit(raw: dict) -> Culprit:
    label = raw.get("caller") or "!".join(str(raw[k]) for k in ("library", "symbol") if raw.get(k)) or "?"
    stack, partial = _stack_lines(raw.get("stack"))
    partial = bool(raw.get("stack_partial", partial))
    known = raw.get("known") if isinstance(raw.get("known"), dict) else {}
    return Culprit(
        str(label),
        int(_float(raw.get("bytes", raw.get("outstanding_bytes")), 0)),
        _float(raw.get("slope_bytes_per_s")),
        _float(raw.get("explained_fraction", raw.get("share"))),
        stack,
        partial,
        tuple(_remedy_text(r) for r in raw.get("remedies") or ()),
        str(known.get("explanation", "")),
        str(raw.get("evidence", "")),
    )


def _last_verdict(rec: Recording) -> dict | None:
    for stream in VERDICT_STREAMS:
        last = next(iter(deque(rec.records(stream), maxlen=1)), None)
        if isinstance(last, dict):
            return last.get("attribution", last) if isinstance(last.get("attribution"), dict) else last
    summary = rec.summary or {}
    if isinstance(summary.get("attribution"), dict):
        return summary["attribution"]
    return summary if summary.get("culprits") else None


def read_culprits(rec: Recording) -> Culprits | None:
    last = _last_verdict(rec)
    if not last or not isinstance(last.get("culprits"), list):
        return None
    culprits = tuple(_culprit(c) for c in last["culprits"] if isinstance(c, dict))
    return Culprits(
        culprits,
        _float(last.get("explained_fraction")),
        _float(last.get("unexplained_bytes")),
        str(last.get("verdict", "") if isinstance(last.get("verdict"), str) else ""),
    )


def read_callers(rec: Recording, t0: float | None, top: int = 8) -> CallerSeries | None:
    """The ledger stream on the sample timeline (t0: wall clock of t=0), top callers by peak."""
    points: list[tuple[float, dict[str, int]]] = []
    for r in rec.records(LEDGER):
        entries = r.get("callers")
        if not isinstance(entries, list) or "ts" not in r:
            continue
        points.append(
            (
                float(r["ts"]),
                {
                    str(e.get("caller", "?")): int(_float(e.get("bytes"), 0))
                    for e in entries
                    if isinstance(e, dict)
                },
            )
        )
    if not any(by for _, by in points):
        return None
    peak: Counter[str] = Counter()
    for _, by in points:
        for caller, n in by.items():
            peak[caller] = max(peak[caller], n)
    callers = tuple(c for c, n in peak.most_common(top) if n > 0)  # balanced callers hold nothing
    if not callers:
        return None
    base = t0 if t0 is not None else points[0][0]
    t = np.array([ts - base for ts, _ in points])
    values = np.array([[by.get(c, 0) for c in callers] for _, by in points], dtype=np.float64)
    return CallerSeries(t, callers, values)


def read_event_counts(rec: Recording, stream: str) -> dict[str, int]:
    return dict(Counter(str(r.get("kind", "?")) for r in rec.records(stream)))


@dataclass(frozen=True)
class TracerTotals:
    """The tracer's own bookkeeping at the end of the ledger stream."""

    records: int
    events: int
    lost_events: int
    outstanding_bytes: int
    outstanding_mappings: int
    duration_s: float


def read_tracer_totals(rec: Recording) -> TracerTotals | None:
    first = last = None
    n = 0
    for r in rec.records(LEDGER):
        first = first or r
        last = r
        n += 1
    if last is None:
        return None
    return TracerTotals(
        n,
        int(_float(last.get("events"), 0)),
        int(_float(last.get("lost_events"), 0)),
        int(_float(last.get("outstanding_bytes"), 0)),
        int(_float(last.get("outstanding_mappings"), 0)),
        _float(last.get("ts"), 0) - _float(first.get("ts"), 0),
    )


#: How much of a growing ledger file is read to find its last record (a record is a few KiB).
_TAIL_BYTES = 256 * 1024


def last_ledger_callers(directory: Path) -> list[tuple[str, int]]:
    """Outstanding bytes by caller in the newest ledger record of a recording that may still be
    being written (trace-mmap --record running beside an exporter): only the file's tail is read."""
    path = Path(directory) / f"{LEDGER}.jsonl"
    try:
        with open(path, "rb") as f:
            start = max(0, f.seek(0, 2) - _TAIL_BYTES)
            f.seek(start)
            lines = f.read().split(b"\n")
    except OSError:
        return []
    for line in reversed(lines[1:] if start else lines):  # past 0 the first line is cut
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the line being written, or a cut first line
        return [
            (str(e.get("caller", "?")), int(_float(e.get("bytes"), 0)))
            for e in record.get("callers", [])
            if isinstance(e, dict)
        ]
    return []
