"""`leakhunt top` for people: the ranked processes, leaking first, with a sparkline each."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from leakhunt import ui
from leakhunt.text import one_line
from leakhunt.top import NodeLine
from leakhunt.units import format_bytes, format_duration

#: Rows in the live table and the final one (--json has every process).
SHOWN = 20


def render_top(lines: list[NodeLine], elapsed: float, duration: float | None) -> Table:
    leaking = sum(1 for line in lines if line.leak)
    table = Table(
        title=(
            f"leakhunt top · {len(lines)} processes · {format_duration(elapsed)}"
            + (f" / {format_duration(duration)}" if duration else "")
            + f" · {leaking} leaking"
        ),
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    for col, justify in (
        ("pid", "right"),
        ("ns pid", "right"),
        ("container / pod", "left"),
        ("command", "left"),
        ("RSS", "right"),
        ("footprint", "right"),
        ("slope /min", "right"),
        ("", "left"),
        ("trend", "left"),
    ):
        table.add_column(col, justify=justify, no_wrap=True, max_width=30 if col == "command" else None)
    for line in lines[:SHOWN]:
        where = line.container or ""
        if line.pod:
            where = f"pod {line.pod[:8]}/{where}" if where else f"pod {line.pod[:8]}"
        table.add_row(
            str(line.pid),
            str(line.nspid) if line.nspid != line.pid else "",
            where,
            Text(one_line(line.command)[:30]),
            format_bytes(line.rss_bytes),
            format_bytes(line.footprint_bytes),
            ui.rate_text(line.footprint_slope_bytes_per_s, leak=line.leak),
            ui.verdict_badge(line.leak) if line.leak else Text(""),
            Text(ui.sparkline(line.trend, 16), style="red" if line.leak else "cyan"),
        )
    return table
