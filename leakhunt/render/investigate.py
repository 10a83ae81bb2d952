"""investigate's terminal views: the live progress, and the result (verdict, the tree's processes,
culprits with stacks, known culprits and remedies). They read typed results only."""

from __future__ import annotations

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from leakhunt import ui
from leakhunt.analysis.correlate import Attribution, Culprit
from leakhunt.analysis.device import device_finding, device_status_line
from leakhunt.analysis.processes import ProcessReport
from leakhunt.investigate.results import BLIND_SPOT, InvestigationResult, Progress
from leakhunt.render.charges import charge_lines
from leakhunt.text import short_command
from leakhunt.units import format_bytes, format_duration, format_rate, format_share


def render_progress(p: Progress) -> Group:
    text = Text()
    text.append("leakhunt investigate ", style="bold")
    text.append(f"{p.target}\n", style="cyan")
    tree = f" · {p.processes} processes" if p.subprocesses else ""
    text.append(
        f"{format_duration(p.elapsed_s)} / {format_duration(p.duration_s)} · "
        f"{p.samples} samples{tree} · {p.tracer} · {p.events} mmap calls",
        style="dim",
    )
    parts = [text]
    if p.last:
        ev = p.last
        v = ev.summary.verdict
        line = Text(f"{ev.summary.main_label} ")
        line.append(format_bytes(ev.summary.main.end), style="bold")
        line.append("  slope ")
        line.append_text(ui.rate_text(v.trend.slope, v.trend.lo, v.trend.hi, v.leak))
        line.append("  ")
        line.append_text(ui.verdict_badge(v.leak, v.plateau))
        parts += [line, culprit_table(ev.attribution, brief=True, pids=p.subprocesses)]
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


def process_table(processes: list[ProcessReport]) -> Table:
    """The tree, one row per process: its memory, its own verdict, the culprits living in it."""
    table = Table(
        title="processes (each judged on its own; the tree above counts shared memory once)",
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    # The footprint when shared objects add to any process's RSS (that is what each is judged on).
    held = any(p.footprint_bytes_end != p.rss_bytes_end for p in processes)
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
        if p.ended:
            state = Text(p.ended, style="dim")
        elif p.own_verdict_leak and not p.leak:
            state = Text("minor", style="dim")  # growing, but a sliver of what the tree grows
        else:
            state = ui.verdict_badge(p.leak, False)
        start, end, slope = (
            (p.footprint_bytes_start, p.footprint_bytes_end, p.footprint_slope_bytes_per_s)
            if held
            else (p.rss_bytes_start, p.rss_bytes_end, p.rss_slope_bytes_per_s)
        )
        table.add_row(
            str(p.pid),
            Text(short_command(p.cmdline)),
            format_bytes(end),
            ui.growth_text(end - start),
            ui.rate_text(slope, leak=p.leak),
            state,
            Text(", ".join(p.culprits)),
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
    tree = result.subprocesses
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
            source = "gdb" if result.gdb and result.gdb.culprit == c.title and result.gdb.stack else "bpf"
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
            f"; gdb: {result.gdb.stacks} full stacks of {result.gdb.culprit}"
            if result.gdb.stacks
            else f"; gdb caught no call of {result.gdb.culprit} within its budget"
        )
    parts.append(Text(evidence, style="dim"))
    for note in result.notes + (stats.notes if stats else []):
        parts.append(Text(f"note: {note}", style="yellow"))
    return Group(*parts)
