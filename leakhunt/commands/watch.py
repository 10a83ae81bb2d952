"""`leakhunt watch --pid PID`: a live, pmap -X-like view sorted by growth, and a verdict."""

from __future__ import annotations

import time

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from leakhunt import ui
from leakhunt.analysis.summary import MemorySummary, summarize
from leakhunt.errors import LeakhuntError
from leakhunt.commands.options import (duration_option, interval_option, json_option, pid_option,
                                       record_option, warmup_option)
from leakhunt.proc.sampler import History, Sample, Sampler, SamplingResult
from leakhunt.proc.target import Target, open_target
from leakhunt.record import SampleRecorder, SessionWriter
from leakhunt.units import format_bytes, format_duration

REFRESH_S = 1.0


@click.command("watch")
@pid_option()
@interval_option()
@duration_option()
@warmup_option
@record_option
@json_option
def command(pid: int, interval: float, duration: float | None, warmup: float | None,
            record_dir: str | None, as_json: bool) -> None:
    """Sample PID's memory every INTERVAL and judge its growth.

    Shows RSS with its slope and confidence interval, a breakdown by region class, and the
    groups and address ranges that grow most. Ctrl-C ends it with a summary.
    """
    target = open_target(pid)
    console = ui.console_for(as_json)
    writer = SessionWriter(record_dir, "watch", {"pid": pid, "cmdline": target.cmdline,
                                                 "interval_s": interval}) if record_dir else None
    recorder = SampleRecorder(writer) if writer else None
    sampler = Sampler(target, interval, keep_raw=writer is not None)
    view = WatchView(target, interval, duration, warmup)

    live = Live(console=console, auto_refresh=False, transient=False, redirect_stdout=False)
    show_live = console.is_terminal

    def on_sample(sample: Sample, history: History) -> None:
        if recorder:
            recorder(sample)
        if show_live:
            view.update(history, live)

    if show_live:
        live.start()
    try:
        result = sampler.run(duration, on_sample)
    finally:
        if show_live:
            live.stop()
    summary = summarize(result.history, warmup_s=warmup)
    document = watch_document(target, result, summary, interval, record_dir)
    if writer:
        if recorder:
            recorder.flush_last()
        if result.error:
            writer.note(str(result.error))
        writer.finish({"command": "watch", **document})
    if as_json:
        ui.emit_json(ui.clean_json(document))
    else:
        console.print(render_summary(target, result, summary, interval))
        if record_dir:
            console.print(f"[dim]recorded in {record_dir} — render it with: leakhunt report {record_dir}[/]")
    if result.error:
        raise LeakhuntError(f"{result.error} after {format_duration(summary.duration_s)} "
                            f"({summary.samples} samples kept{', recorded' if record_dir else ''})")


def watch_document(target: Target, result: SamplingResult, summary: MemorySummary, interval: float,
                   record_dir: str | None) -> dict:
    return {
        **summary.to_json(),
        "pid": target.pid,
        "cmdline": target.cmdline,
        "interval_s": interval,
        "stopped_because": result.stopped_because,
        "sample_cost_s": (sum(result.history.cost_s) / len(result.history)) if len(result.history) else None,
        "record": record_dir,
    }


class WatchView:
    """The live display, rebuilt at most once per REFRESH_S from the history."""

    def __init__(self, target: Target, interval: float, duration: float | None, warmup: float | None) -> None:
        self.target = target
        self.interval = interval
        self.duration = duration
        self.warmup = warmup
        self._last = 0.0

    def update(self, history: History, live: Live) -> None:
        now = time.monotonic()
        if now - self._last < REFRESH_S and len(history) > 1:
            return
        self._last = now
        summary = summarize(history, warmup_s=self.warmup)
        live.update(render_live(self.target, history, summary, self.interval, self.duration), refresh=True)


def _header(target: Target, history: History, summary: MemorySummary, interval: float,
            duration: float | None) -> Text:
    elapsed = format_duration(history.duration_s)
    if duration:
        elapsed += f" / {format_duration(duration)}"
    cost = history.cost_s[-1] * 1000 if history.cost_s else 0
    text = Text()
    text.append("leakhunt watch ", style="bold")
    text.append(f"{target.describe()}\n", style="cyan")
    text.append(f"{elapsed} · {len(history)} samples every {format_duration(interval)} · "
                f"{len(history.last.snapshot) if history.last else 0} mappings · sample cost {cost:.0f} ms",
                style="dim")
    return text


def _rss_line(summary: MemorySummary, history: History) -> Text:
    v = summary.rss.verdict
    text = Text("RSS ", style="bold")
    text.append(format_bytes(summary.rss.end), style="bold")
    text.append("  ")
    text.append_text(ui.growth_text(summary.rss.growth))
    text.append("  slope ")
    text.append_text(ui.rate_text(v.trend.slope, v.trend.lo, v.trend.hi, v.leak))
    text.append("  ")
    text.append_text(ui.verdict_badge(v.leak, v.plateau))
    text.append("  " + ui.sparkline(history.rss, 32), style="red" if v.leak else "cyan")
    text.append(f"\n{v.reason}", style="dim")
    return text


def _class_table(summary: MemorySummary, history: History) -> Table:
    table = Table(title="by class", title_justify="left", expand=False, box=None, pad_edge=False)
    for col, justify in (("class", "left"), ("RSS", "right"), ("growth", "right"),
                         ("slope /min [95% interval]", "right"), ("trend", "left")):
        table.add_column(col, justify=justify)
    for klass, s in sorted(summary.classes.items(), key=lambda kv: -kv[1].growth):
        table.add_row(klass.value, format_bytes(s.end), ui.growth_text(s.growth),
                      ui.rate_text(s.verdict.trend.slope, s.verdict.trend.lo, s.verdict.trend.hi,
                                   s.verdict.leak),
                      ui.sparkline(history.classes[klass]))
    return table


def _group_table(summary: MemorySummary, history: History) -> Table:
    table = Table(title="top growing groups", title_justify="left", box=None, pad_edge=False)
    for col, justify in (("class", "left"), ("path", "left"), ("regions", "right"), ("RSS", "right"),
                         ("growth", "right"), ("slope /min", "right"), ("trend", "left")):
        table.add_column(col, justify=justify, overflow="fold" if col == "path" else "ellipsis")
    for g in summary.groups:
        table.add_row(g.klass.value, Text(g.label), str(g.regions), format_bytes(g.end),
                      ui.growth_text(g.growth), ui.rate_text(g.verdict.trend.slope, leak=g.verdict.leak),
                      ui.sparkline(history.group_series((g.klass, g.path))))
    if not summary.groups:
        table.add_row("", Text("nothing grew", style="dim"), "", "", "", "", "")
    return table


def _region_table(summary: MemorySummary) -> Table:
    table = Table(title="top growing address ranges (since the first sample)", title_justify="left",
                  box=None, pad_edge=False)
    for col, justify in (("range", "left"), ("class", "left"), ("path", "left"), ("RSS", "right"),
                         ("growth", "right"), ("", "left")):
        table.add_column(col, justify=justify)
    for r in summary.regions[:8]:
        table.add_row(f"{r.start:012x}-{r.end:012x}", r.klass.value, Text(r.path), format_bytes(r.rss),
                      ui.growth_text(r.growth), Text("new", style="yellow") if r.new else "")
    return table


def render_live(target: Target, history: History, summary: MemorySummary, interval: float,
                duration: float | None) -> Group:
    return Group(_header(target, history, summary, interval, duration), _rss_line(summary, history),
                 Text(""), _class_table(summary, history), Text(""), _group_table(summary, history),
                 Text(""), _region_table(summary))


def render_summary(target: Target, result: SamplingResult, summary: MemorySummary, interval: float) -> Group:
    history = result.history
    title = Text(f"summary — stopped: {result.stopped_because}", style="bold")
    return Group(title, _header(target, history, summary, interval, None), _rss_line(summary, history),
                 Text(""), _class_table(summary, history), Text(""), _group_table(summary, history),
                 Text(""), _region_table(summary))
