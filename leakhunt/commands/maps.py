"""`leakhunt maps (--pid PID | FILE)`: one classified snapshot, like pmap -X but grouped by class
and path and sorted by size. FILE is a saved smaps (gzip too), `pmap -X` output or a recording."""

from __future__ import annotations

import click
import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text

from leakhunt import sources, ui
from leakhunt.commands.options import json_option
from leakhunt.errors import BadInput
from leakhunt.proc.classes import CLASSES
from leakhunt.proc.growth import groups
from leakhunt.proc.smaps import Snapshot
from leakhunt.units import format_bytes


@click.command("maps")
@click.argument("file", required=False, type=click.Path(dir_okay=True))
@click.option("--pid", "-p", type=int, help="a live process instead of a file")
@click.option("--top", type=int, default=30, show_default=True, help="groups to show (0: all)")
@json_option
def command(file: str | None, pid: int | None, top: int, as_json: bool) -> None:
    """Print one classified snapshot of PID or FILE."""
    if (file is None) == (pid is None):
        raise BadInput("give either --pid PID or a FILE (saved smaps, pmap -X output, or a recording)")
    loaded = sources.live(pid) if pid is not None else sources.load(file)
    doc = maps_document(loaded.snapshot, loaded.label, top)
    if as_json:
        ui.emit_json(doc)
    else:
        ui.out.print(render(doc, top))


def maps_document(snap: Snapshot, label: str, top: int = 0) -> dict:
    g = sorted(groups(snap).items(), key=lambda kv: (-kv[1].rss, kv[0][0].value, kv[0][1]))
    counts = np.bincount(snap.classes, minlength=len(CLASSES)).tolist() if len(snap) else [0] * len(CLASSES)
    regions_by_class = {c: n for c, n in zip(CLASSES, counts) if n}
    rss = snap.class_totals()
    pss = snap.class_totals("Pss")
    swap = snap.class_totals("Swap")
    return {
        "source": label,
        "rss_bytes": snap.total_rss,
        "pss_bytes": snap.total("Pss"),
        "swap_bytes": snap.total("Swap"),
        "regions": len(snap),
        "gpu_process": snap.gpu_process,
        "classes": {
            c.value: {
                "rss_bytes": rss[c],
                "pss_bytes": pss[c],
                "swap_bytes": swap[c],
                "regions": regions_by_class[c],
            }
            for c in CLASSES
            if c in regions_by_class
        },
        "groups": [
            {
                "class": k[0].value,
                "path": k[1],
                "rss_bytes": s.rss,
                "pss_bytes": s.pss,
                "size_bytes": s.size,
                "regions": s.regions,
            }
            for k, s in (g[:top] if top else g)
        ],
    }


def render(doc: dict, top: int) -> Group:
    """The document of maps_document() as tables."""
    label = doc["source"]
    total = max(doc["rss_bytes"], 1)
    head = Text()
    head.append("leakhunt maps ", style="bold")
    head.append(label, style="cyan")
    head.append(
        f"  {doc['regions']} mappings · RSS {format_bytes(doc['rss_bytes'])} · "
        f"PSS {format_bytes(doc['pss_bytes'])}" + (" · GPU process" if doc["gpu_process"] else ""),
        style="dim",
    )
    classes = Table(title="by class", title_justify="left", box=None, pad_edge=False)
    for col in ("class", "RSS", "share", "PSS", "swap", "regions"):
        classes.add_column(col, justify="left" if col == "class" else "right")
    for name, c in sorted(doc["classes"].items(), key=lambda kv: -kv[1]["rss_bytes"]):
        classes.add_row(
            name,
            format_bytes(c["rss_bytes"]),
            f"{100 * c['rss_bytes'] / total:.1f}%",
            format_bytes(c["pss_bytes"]),
            format_bytes(c["swap_bytes"]),
            str(c["regions"]),
        )
    grouped = Table(
        title=f"by class and path (top {top})" if top else "by class and path",
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
    for g in doc["groups"]:
        grouped.add_row(
            g["class"],
            Text(g["path"] or f"[{g['class']}]"),
            str(g["regions"]),
            format_bytes(g["size_bytes"]),
            format_bytes(g["rss_bytes"]),
            format_bytes(g["pss_bytes"]),
        )
    return Group(head, Text(""), classes, Text(""), grouped)
