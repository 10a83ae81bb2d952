"""What a gdb session may cost the target, and what it did cost.

A Budget bounds a session (hits handled, wall time) and thins it (every Nth stack-carrying hit,
through gdb ignore counts, so skipped hits never reach leakhunt). A CostMeter adds up the time each
thread spent stopped on leakhunt's behalf, as leakhunt saw it: from the ``*stopped`` record to
the ``^running`` of the command that resumed the thread. It misses gdb's own work before it
reports a stop (condition evaluation, stepping over the breakpoint), which bench/gdb.py measures
from the target's side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Budget:
    max_hits: int | None = None  # handled hits (stops with an event), then detach
    max_seconds: float | None = None  # wall time from attach, then detach
    every_nth: int = 1  # stack-carrying hits: take 1 in N

    def __post_init__(self) -> None:
        if self.max_hits is not None and self.max_hits < 1:
            raise ValueError("the hit budget must be at least 1")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError("the time budget must be positive")
        if self.every_nth < 1:
            raise ValueError("sampling must take every Nth hit with N >= 1")

    def exhausted(self, hits: int, started: float, now: float | None = None) -> str | None:
        """Why the session must end now, or None."""
        if self.max_hits is not None and hits >= self.max_hits:
            return f"hit budget reached ({self.max_hits} hits)"
        if self.max_seconds is not None and (now or time.monotonic()) - started >= self.max_seconds:
            return f"time budget reached ({self.max_seconds:g}s)"
        return None


@dataclass
class CostMeter:
    attach_s: float = 0.0  # from `attach` to the threads running again
    symbols_s: float = 0.0  # reading the libraries' symbols, the target running
    detach_s: float = 0.0
    stopped_s: float = 0.0  # all hits, all threads
    hits: int = 0  # hits measured
    max_hit_s: float = 0.0
    per_hit: list[float] = field(default_factory=list, repr=False)

    KEEP = 10_000  # per-hit samples kept for percentiles; totals stay exact beyond

    def add_hit(self, stopped_s: float) -> None:
        self.stopped_s += stopped_s
        self.hits += 1
        self.max_hit_s = max(self.max_hit_s, stopped_s)
        if len(self.per_hit) < self.KEEP:
            self.per_hit.append(stopped_s)

    @property
    def mean_hit_s(self) -> float:
        return self.stopped_s / self.hits if self.hits else 0.0

    def percentile(self, q: float) -> float:
        if not self.per_hit:
            return 0.0
        ordered = sorted(self.per_hit)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def to_json(self) -> dict:
        return {
            "attach_s": self.attach_s,
            "symbols_s": self.symbols_s,
            "detach_s": self.detach_s,
            "stopped_s": self.stopped_s,
            "hits": self.hits,
            "mean_hit_s": self.mean_hit_s,
            "p99_hit_s": self.percentile(0.99),
            "max_hit_s": self.max_hit_s,
        }

    def summary(self) -> str:
        if not self.hits:
            return f"attach {self.attach_s * 1000:.0f} ms, no hits"
        return (
            f"target stopped {self.stopped_s * 1000:.0f} ms over {self.hits} hits "
            f"({self.mean_hit_s * 1000:.2f} ms per hit, p99 {self.percentile(0.99) * 1000:.2f} ms), "
            f"attach {self.attach_s * 1000:.0f} ms"
        )
