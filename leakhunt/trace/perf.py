"""`--backend perf`: not provided. The BPF backends already unwind with DWARF (CFI of each module
over a stack copied in the kernel), at a fraction of the cost of `perf record --call-graph dwarf`,
which copies 8 KiB of stack per event through perf.data and unwinds every one of them."""

from __future__ import annotations

from leakhunt.trace.backend import Backend


class PerfBackend(Backend):
    name = "perf"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return "not provided: bcc and bpftrace unwind copied stacks with DWARF themselves"

    def start(self) -> None:  # pragma: no cover - unavailable_reason() always stops it first
        raise NotImplementedError

    def poll(self, timeout: float):  # pragma: no cover
        return []

    def stop(self) -> None:  # pragma: no cover
        return None
