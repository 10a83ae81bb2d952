"""Readers of the tracer and correlator streams a recording may hold, read back into the types
their writers wrote. The one place that knows their on-disk shape:

``ledger.jsonl`` (trace-mmap --record, trace.session): periodic outstanding bytes by caller::

    {"ts": 1716.2, "callers": [{"caller": "libleakpool.so!lkpool_grow", "bytes": 8388608,
                                "mappings": 8}, ...]}

``verdict.jsonl`` (investigate; the last record counts): investigate.results' Evaluation
``to_record()``, whose "attribution" is analysis.correlate's ``Attribution.to_json()``, read back
with ``Attribution.from_json()``; summary.json's "attribution" when there is no verdict stream.

Unknown keys are ignored and missing ones default, so that the report survives the streams'
shapes growing.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leakhunt.analysis.correlate import Attribution
from leakhunt.record import Recording

LEDGER = "ledger"
VERDICT = "verdict"


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


def read_attribution(rec: Recording) -> Attribution | None:
    """The correlator's last word: the last record of the verdict stream (investigate), else the
    summary's attribution. None when neither holds culprits to show."""
    last = next(iter(deque(rec.records(VERDICT), maxlen=1)), None)
    doc = last.get("attribution") if isinstance(last, dict) else None
    if not isinstance(doc, dict):
        doc = (rec.summary or {}).get("attribution")
    if not isinstance(doc, dict):
        return None
    try:
        return Attribution.from_json(doc)
    except (TypeError, ValueError, AttributeError):
        return None  # a record cut or written by hand: the report goes on without culprits


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
