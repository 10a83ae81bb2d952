"""`leakhunt maps` for people: the totals, a table by class and one by class and path."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from leakhunt.analysis.maps import MapsSummary
from leakhunt.units import format_bytes


def render_maps(m: MapsSummary) -> Group:
    total = max(m.rss_bytes, 1)
    head = Text()
    head.append("leakhunt maps ", style="bold")
    head.append(m.source, style="cyan")
    head.append(
        f"  {m.regions} mappings · RSS {format_bytes(m.rss_bytes)} · PSS {format_bytes(m.pss_bytes)}"
        + (" · GPU process" if m.gpu_process else ""),
        style="dim",
    )
    classes = Table(title="by class", title_justify="left", box=None, pad_edge=False)
    for col in ("class", "RSS", "share", "PSS", "swap", "regions"):
        classes.add_column(col, justify="left" if col == "class" else "right")
    for c in sorted(m.classes, key=lambda c: -c.rss_bytes):
        classes.add_row(
            c.klass.value,
            format_bytes(c.rss_bytes),
            f"{100 * c.rss_bytes / total:.1f}%",
            format_bytes(c.pss_bytes),
            format_bytes(c.swap_bytes),
            str(c.regions),
        )
    grouped = Table(
        title=f"by class and path (top {m.top})" if m.top else "by class and path",
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    for col in ("class", "path", "regions", "size", "RSS", "PSS"):
        grouped.add_column(
            col,
            justify="left" if col in ("class", "path") else "right",
            overflow="fold" if col == "path" else "ellipsis",
        )
    for g in m.groups:
        grouped.add_row(
            g.klass.value,
            Text(g.path or f"[{g.klass.value}]"),
            str(g.regions),
            format_bytes(g.size_bytes),
            format_bytes(g.rss_bytes),
            format_bytes(g.pss_bytes),
        )
    return Group(head, Text(""), classes, Text(""), grouped)
