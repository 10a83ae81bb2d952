"""`leakhunt diff A B`: what grew between two snapshots (files or recorded samples)."""

from __future__ import annotations

import click

from leakhunt import sources, ui
from leakhunt.commands.options import json_option
from leakhunt.proc.diff import diff
from leakhunt.render.diff import render


@click.command("diff")
@click.argument("before")
@click.argument("after")
@click.option("--top", type=int, default=20, show_default=True, help="groups and ranges to show")
@json_option
def command(before: str, after: str, top: int, as_json: bool) -> None:
    """Compare snapshot BEFORE with AFTER.

    Each is a saved smaps, `pmap -X` output, or a sample of a recording: DIR (its last full
    snapshot), DIR@first, DIR@last or DIR@SEQ.
    """
    a, b = sources.load(before), sources.load(after)
    d = diff(a.snapshot, b.snapshot, top_ranges=top)
    if as_json:
        doc = d.to_json()
        doc.update(before=a.label, after=b.label, groups=doc["groups"][:top] if top else doc["groups"])
        ui.emit_json(doc)
    else:
        ui.out.print(render(d, a.label, b.label, top))
