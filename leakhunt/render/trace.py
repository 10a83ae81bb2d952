"""trace-mmap for people: the header, outstanding memory by caller, the top caller's stack, and
with --faults the pages each caller faulted in. Reads a TraceSummary, live or final."""

from __future__ import annotations

import math

from rich.console import Group
from rich.table import Table
from rich.text import Text

from leakhunt import ui
from leakhunt.trace.session import CallerView
from leakhunt.trace.summary import TOP, FaultSummary, TraceSummary
from leakhunt.units import format_bytes, format_duration


def render_trace(s: TraceSummary, duration: float | None, final: bool = False, width: int = 80) -> Group:
    parts = [
        _header(s, duration, final),
        Text(
            f"outstanding {format_bytes(s.outstanding_bytes)} in {s.outstanding_mappings} "
            "mappings made while tracing",
            style="bold",
        ),
        Text(""),
        _table(s.callers, width),
        Text(""),
        _top_stack(s.callers),
    ]
    if s.faults is not None:
        parts += [Text(""), _fault_table(s.faults)]
    parts += [Text(f"note: {note}", style="yellow") for note in s.notes]
    return Group(*parts)


def _header(s: TraceSummary, duration: float | None, final: bool) -> Text:
    text = Text()
    if final:
        text.append(f"summary — stopped: {s.stopped_because}\n", style="bold")
    text.append("leakhunt trace-mmap ", style="bold")
    text.append(f"{s.target}\n", style="cyan")
    clock = format_duration(s.duration_s) + (
        f" / {format_duration(duration)}" if duration and not final else ""
    )
    rate = s.events / s.duration_s if s.duration_s > 0 else 0.0
    text.append(
        f"{clock} · backend {s.backend} · {s.events} calls ({rate:,.0f}/s) · {s.streamed} to user space · ",
        style="dim",
    )
    text.append(f"{s.lost} lost", style="bold red" if s.lost else "dim")
    if s.untracked_in_kernel:
        text.append(
            f" · {s.untracked_in_kernel} unmaps of untracked memory (decided in the kernel)", style="dim"
        )
    if s.filtered:
        text.append(f" · {s.filtered} below --min-size", style="dim")
    if s.backlog:
        text.append(
            f"\nreader behind: {s.backlog} calls not applied yet; the figures cover the first "
            f"{format_duration(s.covered_s or 0.0)} of {format_duration(s.duration_s)}",
            style="bold yellow",
        )
    return text


def _table(callers: tuple[CallerView, ...], width: int) -> Table:
    table = Table(
        title="outstanding by caller (library!function past the libc wrapper)",
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    wide = width >= 100  # mapped/unmapped totals only where they fit
    columns = [("outstanding", 11), ("share", 5), ("/min", 9), ("maps", 5), ("calls", 6)]
    columns += [("mapped", 9), ("unmapped", 9)] if wide else []
    table.add_column("caller", no_wrap=True, overflow="ellipsis", ratio=1, min_width=16)
    for col, min_width in columns:
        table.add_column(col, justify="right", no_wrap=True, min_width=min_width)
    total = sum(c.totals.outstanding_bytes for c in callers) or 1
    for view in callers[:TOP]:
        c = view.totals
        rate = Text("…", style="dim") if math.isnan(view.rate) else ui.growth_text(view.rate * 60)
        row = [
            c.label,
            ui.growth_text(c.outstanding_bytes),
            f"{100 * c.outstanding_bytes / total:.0f}%",
            rate,
            str(c.mappings),
            str(c.count),
        ]
        row += [format_bytes(c.mapped_bytes), format_bytes(c.unmapped_bytes)] if wide else []
        table.add_row(*row)
    if not callers:
        table.add_row(Text("no mapping calls yet", style="dim"), *[""] * len(columns))
    return table


def _top_stack(callers: tuple[CallerView, ...]) -> Text:
    if not callers or not callers[0].totals.stack or not callers[0].totals.outstanding_bytes:
        return Text("")
    c = callers[0].totals
    text = Text(f"stack of {c.label}", style="bold")
    text.append(" (partial)" if c.stack.partial else "", style="dim")
    for frame in c.stack.frames:
        text.append(f"\n  {frame}")
    return text


def _fault_table(f: FaultSummary) -> Table:
    sampled = ", sampled and scaled" if f.sampled else ""
    if f.given_back_pages is None:
        title = f"pages faulted in, by the code above the allocator ({f.seen} faults; bpftrace: not netted)"
    else:
        title = (
            f"pages faulted in and still held, by the code above the allocator ({f.seen} faults seen, "
            f"{f.given_back_pages} pages given back since{sampled})"
        )
    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for col, justify in (("caller", "left"), ("allocator", "left"), ("bytes", "right"), ("pages", "right")):
        table.add_column(col, justify=justify)
    for t in f.by_caller:
        table.add_row(Text(t.label), ", ".join(t.allocators), format_bytes(t.pages * 4096), str(t.pages))
    if not f.by_caller:
        table.add_row(Text("no page faults yet", style="dim"), "", "", "")
    return table
