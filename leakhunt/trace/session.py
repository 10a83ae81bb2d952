"""Drive a tracer backend over a target: pick the backend, feed the ledger, record, keep the
by-caller history that rates come from. What `trace-mmap` (and `investigate`) run.

Recording (``--record DIR``, through leakhunt.record.SessionWriter), streams:

``events.jsonl``   MmapEvent.to_record() of every event that reached user space. BPF backends
                   resolve plain mmaps and their exact munmaps in the kernel (that is what keeps
                   their overhead low): those are counted in ``ledger`` records, not recorded one
                   by one, unless the trace ran with ``--all-events``.
``ledger.jsonl``   every LEDGER_EVERY_S, outstanding bytes by caller::

    {"ts": 1716900000.5, "t": 12.0, "outstanding_bytes": 25165824, "outstanding_mappings": 24,
     "events": 20114, "lost_events": 0,
     "callers": [{"caller": "libleakpool.so!lkpool_grow", "library": "libleakpool.so",
                  "symbol": "lkpool_grow", "bytes": 25165824, "mappings": 24, "count": 24,
                  "mapped_bytes": 25165824, "unmapped_bytes": 0}, ...]}     (top LEDGER_TOP)

``outstanding.jsonl``  at the end, one record per outstanding mapping:
                   {"pid", "start", "end", "bytes", "caller", "ts", "held_by"}
``summary.json``   the same document as ``trace-mmap --json``.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from leakhunt.errors import BackendUnavailable
from leakhunt.proc.target import PROC, Target
from leakhunt.record import EVENTS, SessionWriter
from leakhunt.trace.backend import BACKENDS, Backend, backend_class
from leakhunt.trace.callers import CallerTotals, by_caller
from leakhunt.trace.events import MmapEvent
from leakhunt.trace.ledger import Ledger

LEDGER = "ledger"
OUTSTANDING = "outstanding"
LEDGER_EVERY_S = 1.0
LEDGER_TOP = 20
RATE_WINDOW_S = 30.0
#: How long stopping may spend on calls read but not applied yet (Ctrl-C, SIGTERM and the
#: duration's end all promise to return within a couple of seconds).
FINAL_S = 1.0
ROOT_FIX = "run as root; `leakhunt doctor --install` sets up the rest"


@dataclass(frozen=True)
class BackendChoice:
    name: str
    cls: type[Backend]
    unavailable: dict[str, str] = field(default_factory=dict)  # the others that do not work, and why

    def explain(self) -> str:
        """One line: what runs, and why the others do not."""
        why = "; ".join(f"{n}: {r}" for n, r in self.unavailable.items())
        return f"backend {self.name}" + (f" (not available: {why})" if why else "")


def choose_backend(name: str = "auto") -> BackendChoice:
    """The named backend if it can run, or with 'auto' the first of BACKENDS that can."""
    reasons: dict[str, str] = {}
    for candidate in BACKENDS if name == "auto" else [name]:
        try:
            cls = backend_class(candidate)
            reason = cls.unavailable_reason()
        except BackendUnavailable as e:
            reason, cls = e.reason, None
        if reason is None and cls is not None:
            if name == "auto":
                rest = [n for n in BACKENDS if n != candidate and n not in reasons]
                reasons.update({n: r for n in rest if (r := _reason(n)) is not None})
            return BackendChoice(candidate, cls, reasons)
        reasons[candidate] = reason
    if name != "auto":
        raise BackendUnavailable(name, reasons[name], _fix(reasons[name]))
    raise BackendUnavailable(
        "tracing",
        "no backend works here: " + "; ".join(f"{n}: {r}" for n, r in reasons.items()),
        _fix(" ".join(reasons.values())),
    )


def _reason(name: str) -> str | None:
    try:
        return backend_class(name).unavailable_reason()
    except BackendUnavailable as e:
        return e.reason


def _fix(reason: str) -> str:
    if "no such backend" in reason:
        return "use --backend " + ", ".join(BACKENDS)
    if "pid namespace" in reason:
        return "--backend gdb works from inside a pid namespace"
    return ROOT_FIX if "root" in reason else "run `leakhunt doctor --install`"


@dataclass(frozen=True)
class CallerView:
    totals: CallerTotals
    rate: float  # outstanding bytes/s over the last RATE_WINDOW_S (NaN until known)

    def to_json(self) -> dict:
        c = self.totals
        return {
            "library": c.library,
            "symbol": c.symbol,
            "caller": c.label,
            "frame": str(c.caller) if c.caller else None,
            "stack": [str(f) for f in c.stack.frames] if c.stack else [],
            "stack_partial": c.stack.partial if c.stack else True,
            "outstanding_bytes": c.outstanding_bytes,
            "mappings": c.mappings,
            "count": c.count,
            "mapped_bytes": c.mapped_bytes,
            "unmapped_bytes": c.unmapped_bytes,
            "rate_bytes_per_s": None if math.isnan(self.rate) else self.rate,
        }


class TraceSession:
    """One backend over one target, feeding a Ledger; optionally recording."""

    def __init__(self, target: Target, backend: Backend, writer: SessionWriter | None = None) -> None:
        self.target = target
        self.backend = backend
        self.writer = writer
        self.ledger = Ledger()
        self.streamed = 0
        self.started = 0.0
        self.started_wall = 0.0
        self.traced_s: float | None = None  # how long it traced, fixed when the loop ends
        self.stopped_because = ""
        self._history: deque[tuple[float, dict[tuple[str, str], int]]] = deque()
        self._last_ledger = 0.0
        self._callers: list[CallerTotals] = []

    def start(self) -> None:
        self.backend.start()
        self.started = time.monotonic()
        self.started_wall = time.time()
        self._seed_brk()

    def _seed_brk(self) -> None:
        """brk growth is counted from the program break when tracing began (the end of [heap])."""
        try:
            for line in (PROC / str(self.target.pid) / "maps").read_text().splitlines():
                if line.endswith("[heap]"):
                    self.ledger.set_brk(self.target.pid, int(line.split("-")[1].split()[0], 16))
        except (OSError, ValueError):
            pass

    @property
    def elapsed(self) -> float:
        if self.traced_s is not None:
            return self.traced_s
        return time.monotonic() - self.started if self.started else 0.0

    def step(self, timeout: float) -> list[MmapEvent]:
        """One poll: events into the ledger and the recording; a ledger record when due."""
        events = self.backend.poll(timeout)
        self._absorb(events)
        return events

    def _absorb(self, events: list[MmapEvent] | np.ndarray) -> None:
        self.ledger.update(events, self.backend.kernel_state())
        self.streamed += len(events)
        if self.writer and len(events):
            if isinstance(events, np.ndarray):  # a BPF backend's batch: objects only to record it
                events = self.backend.to_events(events)
            self.writer.append_many(EVENTS, events)
        now = time.monotonic()
        if now - self._last_ledger >= LEDGER_EVERY_S:
            self._last_ledger = now
            self._snapshot(now)

    def _snapshot(self, now: float) -> None:
        self._callers = by_caller(self.ledger)
        self._history.append((now, {(c.library, c.symbol): c.outstanding_bytes for c in self._callers}))
        while self._history and now - self._history[0][0] > RATE_WINDOW_S:
            self._history.popleft()
        if self.writer:
            self.writer.append(LEDGER, self.ledger_record(now))

    def ledger_record(self, now: float) -> dict:
        total = sum(c.outstanding_bytes for c in self._callers)
        return {
            "ts": time.time(),
            "t": round(now - self.started, 3),
            "outstanding_bytes": total,
            "outstanding_mappings": sum(c.mappings for c in self._callers),
            "events": self.backend.stats.events,
            "lost_events": self.backend.stats.lost_events,
            "callers": [
                {
                    "caller": c.label,
                    "library": c.library,
                    "symbol": c.symbol,
                    "bytes": c.outstanding_bytes,
                    "mappings": c.mappings,
                    "count": c.count,
                    "mapped_bytes": c.mapped_bytes,
                    "unmapped_bytes": c.unmapped_bytes,
                }
                for c in self._callers[:LEDGER_TOP]
            ],
        }

    def callers(self) -> list[CallerView]:
        if not self._callers:
            self._callers = by_caller(self.ledger)
        return [CallerView(c, self._rate((c.library, c.symbol), c.outstanding_bytes)) for c in self._callers]

    def _rate(self, key: tuple[str, str], current: int) -> float:
        if len(self._history) < 2:
            return float("nan")
        t0, first = self._history[0]
        t1 = self._history[-1][0]
        return (current - first.get(key, 0)) / (t1 - t0) if t1 > t0 else float("nan")

    def stop(self) -> None:
        """Detach, then take in what arrived meanwhile, for FINAL_S at most (what a reader that
        fell behind still holds then is left, and said); the ledger is final after this."""
        self.backend.stop()
        deadline = time.monotonic() + FINAL_S
        self._absorb(self.backend.poll(0))
        while self.backend.backlog and time.monotonic() < deadline:
            self._absorb(self.backend.poll(0))
        self._snapshot(time.monotonic())
        if self.ledger.dropped:
            self.backend.stats.notes.append(
                f"{self.ledger.dropped} mappings were not kept: the ledger's range limit was reached"
            )
        if self.writer:
            self.writer.append_many(OUTSTANDING, self._outstanding_records())

    def _outstanding_records(self) -> list[dict]:
        info = self.ledger.site_info
        out = []
        for o in self.ledger.outstanding():
            caller = info.get(o.site, (None, None))[0]
            out.append(
                {
                    "pid": o.pid,
                    "start": o.start,
                    "end": o.end,
                    "bytes": o.end - o.start,
                    "caller": str(caller) if caller else None,
                    "ts": o.ts / 1e9,
                    "held_by": o.held_by,
                }
            )
        return out

    def run(self, duration: float | None, on_step=None, poll_s: float = 0.5) -> str:
        """Poll until the duration, Ctrl-C, the target's exit or the backend's own end; always
        stops the backend. Returns why it stopped."""
        try:
            while True:
                if duration is not None and self.elapsed >= duration:
                    self.stopped_because = "duration"
                    break
                left = poll_s if duration is None else max(0.0, min(poll_s, duration - self.elapsed))
                self.step(left)
                if on_step:
                    on_step(self)
                if self.backend.target_exited:
                    self.stopped_because = "target exited"
                    break
                if self.backend.finished:
                    self.stopped_because = f"backend finished: {self.backend.finished}"
                    break
        except KeyboardInterrupt:
            self.stopped_because = "interrupted"
        finally:
            self.traced_s = self.elapsed
            with _interrupts_deferred():
                self.stop()
        return self.stopped_because


@contextmanager
def _interrupts_deferred():
    """While detaching, a second Ctrl-C (or the SIGTERM a supervisor sends after the first) must not
    cut the stop short: the target's probes would be left in place and the summary lost. Stopping
    is bounded by the backends' own timeouts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
