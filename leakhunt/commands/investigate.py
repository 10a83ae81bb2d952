"""`leakhunt investigate --pid PID [--subprocesses]`: which library leaks, in which process, how
fast, with which stack, and what to do."""

from __future__ import annotations

import time

import click
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from leakhunt import ui
from leakhunt.analysis.correlate import Attribution, Culprit
from leakhunt.analysis.device import device_finding, device_status_line
from leakhunt.commands.charges import charge_lines
from leakhunt.commands.options import (
    DURATION,
    hint_children,
    interval_option,
    json_option,
    pid_option,
    record_option,
    session_writer,
    warmup_option,
)
from leakhunt.errors import LeakhuntError
from leakhunt.investigate import (
    BLIND_SPOT,
    Evaluation,
    InvestigateOptions,
    Investigation,
    InvestigationResult,
)
from leakhunt.investigate_tree import short_command
from leakhunt.proc.target import open_target
from leakhunt.trace.backend import BACKENDS
from leakhunt.units import format_bytes, format_duration, format_rate, format_share

REFRESH_S = 1.0


@click.command("investigate")
@pid_option()
@click.option(
    "--duration",
    "-d",
    type=DURATION,
    default="60s",
    show_default=True,
    help="the longest it runs; it stops earlier once the verdict is confident",
)
@interval_option()
@warmup_option
@click.option(
    "--backend",
    "-b",
    type=click.Choice(["auto", *BACKENDS]),
    default="auto",
    show_default=True,
    help="mmap tracer",
)
@click.option(
    "--gdb-stacks/--no-gdb-stacks",
    default=True,
    show_default=True,
    help="when the BPF stack of the top caller is shallow, take a few full stacks with gdb",
)
@click.option(
    "--subprocesses",
    "--follow",
    "subprocesses",
    is_flag=True,
    help="the whole tree under PID: every process sampled and traced (children that come later "
    "too), culprits named with their pid, shared memory counted once",
)
@record_option
@json_option
def command(
    pid: int,
    duration: float,
    interval: float,
    warmup: float | None,
    backend: str,
    gdb_stacks: bool,
    subprocesses: bool,
    record_dir: str | None,
    as_json: bool,
) -> None:
    """Sample PID's memory and trace its mmaps together, then name the caller that holds the growth.

    Prints the footprint's slope (RSS plus the shared memory it holds) with its interval, the
    culprits ranked by the growth they explain (with stack and remedies), and how much of the
    growth is explained at all.
    """
    target = open_target(pid)
    console = ui.console_for(as_json)
    hint_children(pid, subprocesses)
    writer = (
        session_writer(
            record_dir,
            "investigate",
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
    options = InvestigateOptions(
        duration=duration,
        interval=interval,
        warmup=warmup,
        backend=backend,
        gdb_stacks=gdb_stacks,
        subprocesses=subprocesses,
    )
    live = Live(console=console, auto_refresh=False, transient=True, redirect_stdout=False)
    show_live = console.is_terminal
    last = [0.0]

    def on_update(inv: Investigation, evaluation: Evaluation | None) -> None:
        now = time.monotonic()
        if show_live and now - last[0] >= REFRESH_S:
            last[0] = now
            live.update(render_progress(inv), refresh=True)

    investigation = Investigation(target, options, writer, on_update)
    if show_live:
        live.start()
    try:
        result = investigation.run()
    finally:
        if show_live:
            live.stop()
    document = result.to_json()
    document["record"] = record_dir
    if writer:
        writer.finish(document)
    if as_json:
        ui.emit_json(ui.clean_json(document))
    else:
        console.print(render_result(result))
        if record_dir:
            console.print(
                Text(f"recorded in {record_dir} — the post-mortem: leakhunt report {record_dir}", style="dim")
            )
    if result.error:
        raise LeakhuntError(
            f"{result.error} after {format_duration(result.summary.duration_s)}; "
            f"the verdict above is from what was collected"
        )


def render_progress(inv: Investigation) -> Group:
    text = Text()
    text.append("leakhunt investigate ", style="bold")
    text.append(f"{inv.target.describe()}\n", style="cyan")
    tracer = inv.choice.name if inv.choice else f"no tracer ({inv.no_tracer})"
    events = inv.tracer.stats.events if inv.tracer else 0
    tree = f" · {len(inv.tree.sampler.live_tracks())} processes" if inv.tree else ""
    text.append(
        f"{format_duration(inv.elapsed)} / {format_duration(inv.options.duration)} · "
        f"{len(inv.history)} samples{tree} · {tracer} · {events} mmap calls",
        style="dim",
    )
    parts = [text]
    if inv.evaluations:
        ev = inv.evaluations[-1]
        v = ev.summary.verdict
        line = Text(f"{ev.summary.main_label} ")
        line.append(format_bytes(ev.summary.main.end), style="bold")
        line.append("  slope ")
        line.append_text(ui.rate_text(v.trend.slope, v.trend.lo, v.trend.hi, v.leak))
        line.append("  ")
        line.append_text(ui.verdict_badge(v.leak, v.plateau))
        parts += [line, culprit_table(ev.attribution, brief=True, pids=inv.tree is not None)]
    return Group(*parts)


def culprit_table(
    attribution: Attribution, brief: bool = False, pids: bool = False, leak: bool = True
) -> Table:
    """Culprits ranked by the growth they explain; with ``pids`` (a tree) the process of each.
    Without a leak the same rows are only what grew: nobody is accused."""
    title = (
        "culprits (ranked by the growth they explain)" if leak else "what grew (no leak: nobody is accused)"
    )
    table = Table(title=None if brief else title, title_justify="left", box=None, pad_edge=False)
    columns = (
        ("#", "right"),
        *((("pid", "right"),) if pids else ()),
        ("culprit", "left"),
        ("class", "left"),
        ("growth", "right"),
        ("share", "right"),
        ("rate", "right"),
    )
    for col, justify in columns:
        table.add_column(
            col,
            justify=justify,
            overflow="fold" if col == "culprit" else "ellipsis",
            no_wrap=col != "culprit",
        )
    for i, c in enumerate(attribution.culprits, 1):
        table.add_row(
            str(i),
            *((str(c.pid or "?"),) if pids else ()),
            Text(c.title, style="bold" if i == 1 else ""),
            c.klass.value,
            format_bytes(c.bytes),
            format_share(c.share),
            format_rate(c.slope),
        )
    if not attribution.culprits:
        table.add_row("", *(("",) if pids else ()), Text("no culprit", style="dim"), "", "", "", "")
    return table


def process_table(processes: list[dict]) -> Table:
    """The tree, one row per process: its memory, its own verdict, the culprits living in it."""
    table = Table(
        title="processes (each judged on its own; the tree above counts shared memory once)",
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    # The footprint when shared objects add to any process's RSS (that is what each is judged on).
    held = any(p.get("footprint_bytes_end", p["rss_bytes_end"]) != p["rss_bytes_end"] for p in processes)
    key = "footprint" if held else "rss"
    # Numbers keep their width; the command is cut short and the culprits fold.
    for col, justify, width in (
        ("pid", "right", 7),
        ("command", "left", None),
        ("footprint" if held else "RSS", "right", 9),
        ("growth", "right", 10),
        ("slope /min", "right", 15),
        ("", "left", 8),
        ("culprits", "left", 16),
    ):
        table.add_column(
            col,
            justify=justify,
            overflow="fold" if col == "culprits" else "ellipsis",
            no_wrap=col != "culprits",
            min_width=width,
            max_width=24 if col == "command" else None,
        )
    for p in processes:
        if p["ended"]:
            state = Text(p["ended"], style="dim")
        elif p["own_verdict_leak"] and not p["leak"]:
            state = Text("minor", style="dim")  # growing, but a sliver of what the tree grows
        else:
            state = ui.verdict_badge(p["leak"], False)
        table.add_row(
            str(p["pid"]),
            Text(short_command(p["cmdline"])),
            format_bytes(p[f"{key}_bytes_end"]),
            ui.growth_text(p[f"{key}_bytes_end"] - p[f"{key}_bytes_start"]),
            ui.rate_text(p[f"{key}_slope_bytes_per_s"], leak=p["leak"]),
            state,
            Text(", ".join(p["culprits"])),
        )
    return table


def _culprit_detail(c: Culprit, source: str) -> Text:
    text = Text()
    text.append(f"{c.title}", style="bold")
    if c.origin:
        text.append(f" called from {c.origin}", style="bold")
    text.append(
        f"  ({c.evidence}{', ' + str(c.mappings) + ' mappings' if c.mappings else ''}"
        f"{', ' + c.detail if c.detail else ''})\n",
        style="dim",
    )
    if c.stack:
        text.append(f"stack ({source}{', partial' if c.stack_partial else ''}):\n", style="dim")
        for line, dim in compact_stack(c.stack):
            text.append(f"    {line}\n", style="dim" if dim else "")
    for creator in c.created_by:
        who = "itself" if creator["pid"] == c.pid else f"pid {creator['pid']}"
        text.append(f"created by {who}", style="bold")
        text.append(f" ({creator['command'][:70]}): {creator['objects']} objects", style="dim")
        if creator["bytes"]:
            text.append(f", {format_bytes(creator['bytes'])} sized", style="dim")
        text.append("\n")
        for line, dim in compact_stack(tuple(creator["stack"])[:12]):
            text.append(f"    {line}\n", style="dim" if dim else "")
    if c.known:
        text.append("known culprit: ", style="dim")
        text.append(f"{c.known.name}\n", style="bold")
        text.append(f"{c.known.explanation}\n", style="italic")
        for remedy in c.known.remedies:
            text.append("  ➜ ", style="green")
            text.append(f"{remedy}\n")
        for ref in c.known.references:
            text.append(f"    {ref}\n", style="dim")
    return text


def compact_stack(frames: tuple[str, ...], run: int = 3) -> list[tuple[str, bool]]:
    """Frames as lines, with long runs inside one library (an interpreter's eval loop, libffi)
    folded into one line: the frames that name the culprit stay readable."""
    lines: list[tuple[str, bool]] = []
    i = 0
    while i < len(frames):
        lib = frames[i].split("!", 1)[0]
        j = i
        while j < len(frames) and frames[j].split("!", 1)[0] == lib:
            j += 1
        if j - i > run:
            lines.append((frames[i], False))
            lines.append((f"… {j - i - 1} more frames in {lib}", True))
        else:
            lines += [(f, False) for f in frames[i:j]]
        i = j
    return lines


def render_result(result: InvestigationResult) -> Group:
    s = result.summary
    v = s.verdict
    a = result.attribution
    head = Text()
    head.append_text(ui.verdict_badge(v.leak, v.plateau))
    head.append("  ")
    head.append(result.verdict() + "\n", style="bold")
    head.append(f"{s.main_label} {format_bytes(s.main.start)} → {format_bytes(s.main.end)}  slope ")
    head.append_text(ui.rate_text(v.trend.slope, v.trend.lo, v.trend.hi, v.leak))
    if s.main_label != "RSS":
        head.append(f"   RSS {format_bytes(s.rss.start)} → {format_bytes(s.rss.end)}  slope ", style="dim")
        head.append_text(ui.rate_text(s.rss.verdict.trend.slope))
    head.append(f"\n{v.reason}", style="dim")
    for line in charge_lines(s):
        head.append("\n")
        head.append_text(line)
    finding = device_finding(s)
    device_line = finding or device_status_line(s, result.device_unavailable)
    if device_line:
        head.append(f"\n{device_line}", style="bold red" if finding else "dim")
    if not result.leak:
        head.append(f"\nnot ruled out: {BLIND_SPOT}", style="dim")
    tree = result.processes is not None
    title = f"leakhunt investigate · {result.target.describe()}" + (" and its subprocesses" if tree else "")
    parts = [
        Panel(head, title=Text(title), title_align="left", border_style="red" if result.leak else "green")
    ]
    if tree:
        parts.append(process_table(result.processes))
    if a.growth > 0:
        parts.append(culprit_table(a, pids=tree, leak=v.leak))
        parts.append(
            Text(
                f"explained {format_share(a.explained_fraction)} of {format_bytes(a.growth)} native growth"
                + (
                    f"; {format_bytes(a.unexplained)} unexplained (growth in memory mapped before tracing "
                    "began, or by calls no tracer saw)"
                    if a.unexplained
                    else ""
                ),
                style="dim",
            )
        )
        for c in a.culprits[:3]:
            source = (
                "gdb"
                if result.gdb and result.gdb.get("culprit") == c.title and result.gdb.get("stack")
                else "bpf"
            )
            parts.append(_culprit_detail(c, source))
    stats = result.stats
    evidence = (
        f"{s.samples} samples over {format_duration(s.duration_s)} (stopped: {result.stopped_because}); "
        + (
            f"backend {result.choice.name}: {stats.events} mmap calls, {stats.lost_events} lost"
            if stats
            else f"no tracer: {result.no_tracer}"
        )
    )
    if result.gdb:
        evidence += (
            f"; gdb: {result.gdb['stacks']} full stacks of {result.gdb.get('culprit')}"
            if result.gdb.get("stacks")
            else f"; gdb caught no call of {result.gdb.get('culprit')} within its budget"
        )
    parts.append(Text(evidence, style="dim"))
    for note in result.notes + (stats.notes if stats else []):
        parts.append(Text(f"note: {note}", style="yellow"))
    return Group(*parts)
