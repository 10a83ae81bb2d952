"""watch's terminal views: the header, the memory lines, classes, growing groups and ranges, and
for a tree one row per process. They read WatchViews (leakhunt.watch)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from leakhunt import ui
from leakhunt.analysis.summary import MemorySummary
from leakhunt.proc.sampler import History
from leakhunt.render.charges import charge_lines, memory_lines, series_line
from leakhunt.units import format_bytes, format_duration
from leakhunt.watch import WatchView


def _header(view: WatchView, what: str) -> Text:
    target, history, interval, duration = view.target, view.history, view.interval, view.duration
    elapsed = format_duration(history.duration_s) + (f" / {format_duration(duration)}" if duration else "")
    cost = history.cost_s[-1] * 1000 if history.cost_s else 0
    text = Text()
    text.append("leakhunt watch ", style="bold")
    text.append(f"{target.describe()}\n", style="cyan")
    text.append(
        f"{elapsed} · {history.samples} samples every {format_duration(interval)} · {what} · "
        f"sample cost {cost:.0f} ms",
        style="dim",
    )
    return text


def _rss_line(summary: MemorySummary, history: History, label: str = "RSS") -> Text:
    text = Text()
    lines = memory_lines(summary, history.rss, history.footprint, label)
    if summary.device is not None:
        lines.append(series_line("device memory (NVML)", summary.device, history.gpu))
    lines += charge_lines(summary)
    for i, line in enumerate(lines):
        if i:
            text.append("\n")
        text.append_text(line)
    return text


def class_table(summary: MemorySummary, history: History) -> Table:
    table = Table(title="by class", title_justify="left", expand=False, box=None, pad_edge=False)
    for col, justify in (
        ("class", "left"),
        ("RSS", "right"),
        ("growth", "right"),
        ("slope /min [95% interval]", "right"),
        ("trend", "left"),
    ):
        table.add_column(col, justify=justify)
    for klass, s in sorted(summary.classes.items(), key=lambda kv: (-kv[1].growth, -kv[1].end)):
        table.add_row(
            klass.value,
            format_bytes(s.end),
            ui.growth_text(s.growth),
            ui.rate_text(s.verdict.trend.slope, s.verdict.trend.lo, s.verdict.trend.hi, s.verdict.leak),
            ui.sparkline(history.classes[klass]),
        )
    return table


def group_table(summary: MemorySummary, history: History) -> Table:
    table = Table(title="top growing groups", title_justify="left", box=None, pad_edge=False)
    for col, justify in (
        ("class", "left"),
        ("path", "left"),
        ("regions", "right"),
        ("RSS", "right"),
        ("growth", "right"),
        ("slope /min", "right"),
        ("trend", "left"),
    ):
        table.add_column(col, justify=justify, overflow="fold" if col == "path" else "ellipsis")
    for g in summary.groups:
        table.add_row(
            g.klass.value,
            Text(g.label),
            str(g.regions),
            format_bytes(g.end),
            ui.growth_text(g.growth),
            ui.rate_text(g.verdict.trend.slope, leak=g.verdict.leak),
            ui.sparkline(history.group_series((g.klass, g.path))),
        )
    if not summary.groups:
        table.add_row("", Text("nothing grew", style="dim"), "", "", "", "", "")
    return table


def region_table(summary: MemorySummary) -> Table:
    table = Table(
        title="top growing address ranges (since the first sample)",
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    for col, justify in (
        ("range", "left"),
        ("class", "left"),
        ("path", "left"),
        ("RSS", "right"),
        ("growth", "right"),
        ("", "left"),
    ):
        table.add_column(col, justify=justify)
    for r in summary.regions[:8]:
        table.add_row(
            f"{r.start:012x}-{r.end:012x}",
            r.klass.value,
            Text(r.path),
            format_bytes(r.rss),
            ui.growth_text(r.growth),
            Text("new", style="yellow") if r.new else "",
        )
    return table


def render_watch(view: WatchView) -> Group:
    """One process: memory lines, classes, groups and ranges; a tree: its processes too."""
    return _render_tree(view) if view.subprocesses else _render_one(view)


def _render_one(view: WatchView) -> Group:
    history, summary = view.history, view.summary
    mappings = len(history.last.snapshot) if history.last else 0
    return Group(
        _header(view, f"{mappings} mappings"),
        _rss_line(summary, history),
        Text(""),
        class_table(summary, history),
        Text(""),
        group_table(summary, history),
        Text(""),
        region_table(summary),
    )


def _render_tree(view: WatchView) -> Group:
    tree, summary = view.history, view.summary
    table = Table(title="processes", title_justify="left", box=None, pad_edge=False)
    for col, justify in (
        ("pid", "right"),
        ("command", "left"),
        ("RSS", "right"),
        ("PSS", "right"),
        ("USS", "right"),
        ("growth", "right"),
        ("slope /min", "right"),
        ("", "left"),
        ("trend", "left"),
    ):
        table.add_column(
            col,
            justify=justify,
            overflow="ellipsis",
            no_wrap=True,
            max_width=28 if col == "command" else None,
        )
    for p in view.processes:
        state = Text(p.ended, style="dim") if p.ended else ui.verdict_badge(p.own_verdict_leak, p.plateau)
        table.add_row(
            str(p.pid),
            Text(p.cmdline),
            format_bytes(p.rss_bytes_end),
            format_bytes(p.pss_bytes),
            format_bytes(p.uss_bytes),
            ui.growth_text(p.rss_bytes_end - p.rss_bytes_start),
            ui.rate_text(p.footprint_slope_bytes_per_s, leak=p.own_verdict_leak),
            state,
            ui.sparkline(view.rss_series.get(p.pid, []), 12),
        )
    return Group(
        _header(view, f"{view.live_processes} processes"),
        _rss_line(summary, tree, "tree memory (shared counted once)"),
        Text(""),
        table,
        Text(""),
        class_table(summary, tree),
        Text(""),
        group_table(summary, tree),
    )
