"""`leakhunt watch --pid PID`: a live, pmap -X-like view sorted by growth, and a verdict.

With --subprocesses the whole tree under PID is watched: every process with its own verdict,
and tree totals that count shared memory once (leakhunt.proc.tree).
"""

from __future__ import annotations

import time

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from leakhunt import ui
from leakhunt.analysis.device import device_finding, device_json, device_status_line
from leakhunt.analysis.summary import MemorySummary, summarize
from leakhunt.commands.charges import charge_lines, memory_lines, series_line
from leakhunt.commands.options import (
    duration_option,
    full_every_option,
    hint_children,
    interval_option,
    json_option,
    pid_option,
    record_option,
    session_writer,
    subprocesses_option,
    warmup_option,
)
from leakhunt.commands.options import full_every as resolve_full_every
from leakhunt.errors import LeakhuntError
from leakhunt.gpu import NvmlReader
from leakhunt.heap import HeapRun
from leakhunt.proc.sampler import History, Sample, Sampler
from leakhunt.proc.target import Target, open_target
from leakhunt.proc.tree import TreeResult, TreeSampler
from leakhunt.record import SampleRecorder, SessionWriter, TreeRecorder
from leakhunt.units import format_bytes, format_duration

REFRESH_S = 1.0


@click.command("watch")
@pid_option()
@interval_option()
@duration_option()
@warmup_option
@full_every_option()
@subprocesses_option
@click.option(
    "--heap",
    is_flag=True,
    help="Python target: memray attached alongside (needs gdb or lldb), so "
    "the report shows the Python heap beside RSS",
)
@record_option
@json_option
def command(
    pid: int,
    interval: float,
    duration: float | None,
    warmup: float | None,
    full_every: int | None,
    subprocesses: bool,
    heap: bool,
    record_dir: str | None,
    as_json: bool,
) -> None:
    """Sample PID's memory every INTERVAL and judge its growth.

    Shows the footprint (RSS plus the shared memory it holds without touching it) and RSS with
    their slopes and confidence intervals, the memory cgroup and /dev/shm, a breakdown by region
    class, and the groups and address ranges that grow most. Ctrl-C ends it with a summary.
    """
    # A tree's shared pages are counted once from every process's snapshot: it reads them all.
    full_every = resolve_full_every(full_every, record_dir or subprocesses)
    target = open_target(pid)
    console = ui.console_for(as_json)
    hint_children(pid, subprocesses)
    writer = (
        session_writer(
            record_dir,
            "watch",
            {
                "pid": pid,
                "nspid": list(target.nspid),
                "cmdline": target.cmdline,
                "interval_s": interval,
                "subprocesses": subprocesses,
            },
        )
        if record_dir
        else None
    )
    live = LiveView(console)
    nvml = NvmlReader.open()
    gpu = nvml if isinstance(nvml, NvmlReader) else None
    heap_run = HeapRun(writer.dir if writer else None) if heap else None
    if heap_run:
        heap_run.attach(pid, duration)
    try:
        with live:
            if subprocesses:
                document, lost, summary = _watch_tree(
                    target, interval, duration, warmup, writer, live, gpu, full_every
                )
            else:
                document, lost, summary = _watch_one(
                    target, interval, duration, warmup, writer, live, gpu, full_every
                )
    finally:
        if heap_run:
            heap_run.finish()
        if gpu:
            gpu.close()
    no_gpu = getattr(nvml, "reason", None)
    document["device_memory"] = device_json(summary, no_gpu)
    document.update(interval_s=interval, record=record_dir)
    if heap_run:
        document.update(heap_growth_bytes=heap_run.growth)
        if writer:
            heap_run.write(writer)
    if writer:
        if lost:
            writer.note(str(lost))
        writer.finish({"command": "watch", **document})
    if as_json:
        ui.emit_json(ui.clean_json(document))
    else:
        console.print(live.final)
        finding = device_finding(summary)
        device_line = finding or device_status_line(summary, no_gpu)
        if device_line:
            console.print(Text(device_line, style="bold red" if finding else "dim"))
        if record_dir:
            console.print(
                Text(f"recorded in {record_dir} — render it with: leakhunt report {record_dir}", style="dim")
            )
    if lost:
        raise LeakhuntError(
            f"{lost} after {format_duration(summary.duration_s)} "
            f"({summary.samples} samples kept{', recorded' if record_dir else ''})"
        )


class LiveView:
    """A rich Live display on terminals, rebuilt at most once per REFRESH_S; nothing otherwise."""

    def __init__(self, console) -> None:
        self.enabled = console.is_terminal
        self.live = Live(console=console, auto_refresh=False, transient=False, redirect_stdout=False)
        self._last = 0.0
        self.final = None

    def due(self, first: bool) -> bool:
        now = time.monotonic()
        if not self.enabled or (now - self._last < REFRESH_S and not first):
            return False
        self._last = now
        return True

    def show(self, renderable) -> None:
        self.live.update(renderable, refresh=True)

    def __enter__(self) -> LiveView:
        if self.enabled:
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.live.stop()


# -- one process -----------------------------------------------------------------------------------


def _watch_one(
    target: Target,
    interval: float,
    duration: float | None,
    warmup: float | None,
    writer: SessionWriter | None,
    live: LiveView,
    gpu: NvmlReader | None,
    full_every: int = 1,
):
    recorder = SampleRecorder(writer) if writer else None
    sampler = Sampler(target, interval, keep_raw=writer is not None, gpu=gpu, full_every=full_every)

    def on_sample(sample: Sample, history: History) -> None:
        if recorder:
            recorder(sample)
        if live.due(len(history) == 1):
            live.show(render_one(target, history, summarize(history, warmup_s=warmup), interval, duration))

    result = sampler.run(duration, on_sample)
    if recorder:
        recorder.flush_last()
    summary = summarize(result.history, warmup_s=warmup).with_true_orphans()
    live.final = Group(
        Text(f"summary — stopped: {result.stopped_because}", style="bold"),
        render_one(target, result.history, summary, interval, None),
    )
    document = {
        **summary.to_json(),
        "full_samples": sampler.full_samples,
        "pid": target.pid,
        "nspid": list(target.nspid),
        "cmdline": target.cmdline,
        "stopped_because": result.stopped_because,
        "sample_cost_s": sum(result.history.cost_s) / len(result.history),
    }
    return document, result.error, summary


def _header(target: Target, history: History, interval: float, duration: float | None, what: str) -> Text:
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


def render_one(
    target: Target, history: History, summary: MemorySummary, interval: float, duration: float | None
) -> Group:
    mappings = len(history.last.snapshot) if history.last else 0
    return Group(
        _header(target, history, interval, duration, f"{mappings} mappings"),
        _rss_line(summary, history),
        Text(""),
        class_table(summary, history),
        Text(""),
        group_table(summary, history),
        Text(""),
        region_table(summary),
    )


# -- a process tree --------------------------------------------------------------------------------


def _watch_tree(
    target: Target,
    interval: float,
    duration: float | None,
    warmup: float | None,
    writer: SessionWriter | None,
    live: LiveView,
    gpu: NvmlReader | None,
    full_every: int = 1,
):
    tree_sampler = TreeSampler(target, interval, keep_raw=writer is not None, gpu=gpu, full_every=full_every)
    recorder = TreeRecorder(writer) if writer else None

    def on_tick(samples: list[Sample], sampler: TreeSampler, tree: History) -> None:
        if recorder:
            recorder(samples, sampler, tree)
        if live.due(len(tree) == 1):
            live.show(render_tree(target, sampler, tree, warmup, interval, duration))

    result = tree_sampler.run(duration, on_tick)
    if recorder:
        recorder.flush_last()
    summary = summarize(result.tree, warmup_s=warmup, pid=target.pid)
    live.final = Group(
        Text(f"summary — stopped: {result.stopped_because}", style="bold"),
        render_tree(target, tree_sampler, result.tree, warmup, interval, None),
    )
    document = {
        **summary.to_json(),
        "pid": target.pid,
        "nspid": list(target.nspid),
        "cmdline": target.cmdline,
        "subprocesses": True,
        "stopped_because": result.stopped_because,
        "tree": {
            "rss_counting": "private pages of every process plus each shared object once",
            "pss_bytes_start": result.pss[0] if result.pss else None,
            "pss_bytes_end": result.pss[-1] if result.pss else None,
            "uss_bytes_start": result.uss[0] if result.uss else None,
            "uss_bytes_end": result.uss[-1] if result.uss else None,
        },
        "processes": process_documents(result, warmup),
        "unreadable": {str(p): why for p, why in tree_sampler.skipped.items()},
    }
    return document, result.error, summary


def process_documents(result: TreeResult, warmup: float | None) -> list[dict]:
    docs = []
    for track in result.tracks:
        if not len(track.history):
            continue
        s = summarize(track.history, warmup_s=warmup)
        last = track.history.last.snapshot
        docs.append(
            {
                "pid": track.target.pid,
                "ppid_root": track is result.root,
                "cmdline": track.target.cmdline,
                "nspid": list(track.target.nspid),
                "samples": s.samples,
                "first_seen_s": track.first_seen,
                "ended": track.ended,
                "ended_at_s": track.ended_at,
                "rss_bytes_start": s.rss.start,
                "rss_bytes_end": s.rss.end,
                "pss_bytes": last.total("Pss"),
                "uss_bytes": last.total("Private_Clean") + last.total("Private_Dirty"),
                "rss_slope_bytes_per_s": s.rss.verdict.trend.slope,
                "slope_interval": s.rss.verdict.trend.interval,
                "footprint_bytes_start": s.main.start,
                "footprint_bytes_end": s.main.end,
                "footprint_slope_bytes_per_s": s.verdict.trend.slope,
                "held_shm": s.held_json(),
                "leak": s.leak,
                "verdict": s.verdict.reason,
                "top_groups": [g.to_json() for g in s.groups[:5]],
            }
        )
    return docs


def render_tree(
    target: Target,
    sampler: TreeSampler,
    tree: History,
    warmup: float | None,
    interval: float,
    duration: float | None,
) -> Group:
    summary = summarize(tree, warmup_s=warmup, pid=target.pid)
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
    for track in sampler.tracks.values():
        h = track.history
        if not len(h):
            continue
        s = summarize(h, warmup_s=warmup)
        last = h.last.snapshot
        state = Text(track.ended, style="dim") if track.ended else ui.verdict_badge(s.leak, s.verdict.plateau)
        table.add_row(
            str(track.target.pid),
            Text(track.target.cmdline),
            format_bytes(s.rss.end),
            format_bytes(last.total("Pss")),
            format_bytes(last.total("Private_Clean") + last.total("Private_Dirty")),
            ui.growth_text(s.rss.growth),
            ui.rate_text(s.verdict.trend.slope, leak=s.leak),
            state,
            ui.sparkline(h.rss, 12),
        )
    what = f"{len(sampler.live_tracks())} processes"
    return Group(
        _header(target, tree, interval, duration, what),
        _rss_line(summary, tree, "tree memory (shared counted once)"),
        Text(""),
        table,
        Text(""),
        class_table(summary, tree),
        Text(""),
        group_table(summary, tree),
    )
