"""Outstanding bytes grouped by caller (library, symbol): what trace-mmap shows and records.

The ledger counts per raw site (pid, syscall ip, return address); many sites are one caller
(several call sites in one function, several processes of a tree), so they are summed here.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from leakhunt.trace.events import Frame, Stack
from leakhunt.trace.ledger import Ledger


@dataclass(frozen=True)
class CallerTotals:
    library: str
    symbol: str
    caller: Frame | None
    stack: Stack | None
    outstanding_bytes: int
    mappings: int  # outstanding mappings (pieces of them after partial unmaps)
    count: int  # mappings made
    mapped_bytes: int
    unmapped_bytes: int

    @property
    def label(self) -> str:
        return f"{self.library}!{self.symbol}"

    def to_json(self) -> dict:
        return {
            "library": self.library,
            "symbol": self.symbol,
            "caller": self.label,
            "frame": str(self.caller) if self.caller else None,
            "stack": self.stack.to_record() if self.stack else None,
            "stack_text": [str(f) for f in self.stack.frames] if self.stack else [],
            "outstanding_bytes": self.outstanding_bytes,
            "mappings": self.mappings,
            "count": self.count,
            "mapped_bytes": self.mapped_bytes,
            "unmapped_bytes": self.unmapped_bytes,
        }


def caller_key(caller: Frame | None) -> tuple[str, str]:
    if caller is None:
        return "?", "?"
    return caller.library, caller.symbol or f"+{caller.offset:#x}"


def by_caller(ledger: Ledger) -> list[CallerTotals]:
    """Callers by outstanding bytes, then by bytes mapped (busy balanced callers come after)."""
    sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    best: dict[tuple[str, str], tuple[tuple[int, int], Frame | None, Stack | None]] = {}
    for site, totals in ledger.site_totals().items():
        caller, stack = ledger.site_info.get(site, (None, None))
        key = caller_key(caller)
        acc = sums[key]
        for i, v in enumerate(totals):
            acc[i] += v
        # The stack shown for a caller is the one of its site holding the most outstanding bytes
        # (the path that leaks, not the busiest balanced one through the same caller), then the
        # one that mapped most.
        weight = (totals[0], totals[3])
        if key not in best or weight > best[key][0] or (best[key][2] is None and stack is not None):
            best[key] = (weight, caller, stack)
    out = [
        CallerTotals(lib, sym, best[(lib, sym)][1], best[(lib, sym)][2], *acc)
        for (lib, sym), acc in sums.items()
    ]
    out.sort(key=lambda c: (-c.outstanding_bytes, -c.mapped_bytes, c.label))
    return out
