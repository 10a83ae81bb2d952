"""`leakhunt maps (--pid PID | FILE)`: one classified snapshot, like pmap -X but grouped by class
and path and sorted by size. FILE is a saved smaps (gzip too), `pmap -X` output or a recording."""

from __future__ import annotations

import click

from leakhunt import sources, ui
from leakhunt.analysis.maps import summarize_maps
from leakhunt.commands.options import json_option
from leakhunt.errors import BadInput
from leakhunt.render.maps import render_maps


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
    summary = summarize_maps(loaded.snapshot, loaded.label, top)
    if as_json:
        ui.emit_json(summary.to_json())
    else:
        ui.out.print(render_maps(summary))
