"""`leakhunt diff`'s view: what grew between two snapshots."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from leakhunt import ui
from leakhunt.proc.diff import SnapshotDiff
from leakhunt.units import format_bytes


def render(d: SnapshotDiff, before: str, after: str, top: int) -> Group:
    head = Text()
    head.append("leakhunt diff ", style="bold")
    head.append(f"{before} → {after}\n", style="cyan")
    head.append(f"RSS {format_bytes(d.rss_before)} → {format_bytes(d.rss_after)}  ")
    head.append_text(ui.growth_text(d.growth))
    classes = Table(title="by class", title_justify="left", box=None, pad_edge=False)
    for col in ("class", "before", "after", "growth"):
        classes.add_column(col, justify="left" if col == "class" else "right")
    for c, (b, a) in sorted(d.classes.items(), key=lambda kv: -(kv[1][1] - kv[1][0])):
        classes.add_row(c.value, format_bytes(b), format_bytes(a), ui.growth_text(a - b))
    groups = Table(title="groups that changed", title_justify="left", box=None, pad_edge=False)
    for col in ("class", "path", "regions", "new", "before", "after", "growth"):
        groups.add_column(
            col,
            justify="left" if col in ("class", "path") else "right",
            overflow="fold" if col == "path" else "ellipsis",
        )
    for g in [g for g in d.groups if g.growth or g.new_regions][:top]:
        groups.add_row(
            g.klass.value,
            Text(g.path or f"[{g.klass.value}]"),
            f"{g.regions_before}→{g.regions_after}",
            str(g.new_regions or ""),
            format_bytes(g.rss_before),
            format_bytes(g.rss_after),
            ui.growth_text(g.growth),
        )
    ranges = Table(title="address ranges that grew", title_justify="left", box=None, pad_edge=False)
    for col in ("range", "class", "path / next to", "RSS", "growth", ""):
        ranges.add_column(col, justify="right" if col in ("RSS", "growth") else "left")
    for r in d.ranges:
        where = (
            Text(r.path)
            if r.path
            else (Text(f"next to {r.neighbour}", style="dim") if r.neighbour else Text(""))
        )
        ranges.add_row(
            f"{r.start:012x}-{r.end:012x}",
            r.klass.value,
            where,
            format_bytes(r.rss),
            ui.growth_text(r.growth),
            Text("new", style="yellow") if r.new else "",
        )
    return Group(head, Text(""), classes, Text(""), groups, Text(""), ranges)
