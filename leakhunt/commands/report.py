"""`leakhunt report DIR`: an HTML and/or Markdown post-mortem of a recording, live or long dead."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.text import Text

from leakhunt import ui
from leakhunt.commands.options import json_option
from leakhunt.errors import BadInput


@click.command("report")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False),
    help="write a self-contained HTML report here (default: DIR/report.html)",
)
@click.option(
    "--markdown",
    "markdown_path",
    type=click.Path(dir_okay=False),
    help="write Markdown here, plots beside it in NAME_plots/ ('-': stdout, without plots)",
)
@json_option
def command(directory: str, html_path: str | None, markdown_path: str | None, as_json: bool) -> None:
    """Render the recording in DIRECTORY as a post-mortem report.

    Works on any recording, including one whose target died or whose leakhunt was killed: it
    shows whatever streams the session holds (samples, Python heap, tracer events and ledger,
    culprits) and says which are missing.
    """
    # Imported here: matplotlib costs a second to load and only this command needs it.
    from leakhunt.report.build import build_report, report_json
    from leakhunt.report.html import render_html
    from leakhunt.report.markdown import render_markdown
    from leakhunt.report.recorded import load

    data = load(directory)
    report = build_report(data)
    if html_path is None and markdown_path is None:
        html_path = str(Path(directory) / "report.html")
    written: dict[str, str] = {}
    if html_path:
        written["html"] = _write(Path(html_path), render_html(report))
    if markdown_path == "-":
        if as_json:
            raise BadInput("--markdown - and --json both want stdout: give --markdown a file")
        sys.stdout.write(render_markdown(report))
    elif markdown_path:
        path = Path(markdown_path)
        written["markdown"] = _write(path, render_markdown(report, path))
    if as_json:
        ui.emit_json(ui.clean_json({**report_json(data, report), "written": written}))
        return
    console = ui.console_for(markdown_path == "-")
    h = report.headline
    style = {"bad": "bold white on red", "warn": "black on yellow", "good": "black on green"}.get(
        h.tone, "reverse"
    )
    console.print(Text.assemble((f" {h.badge} ", style), f" {h.answer}"))
    console.print(Text(f"{len(report.sections)} sections, {len(report.figures())} plots", style="dim"))
    for kind, path in written.items():
        console.print(f"{kind}: {path}")


def _write(path: Path, text: str) -> str:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise BadInput(f"cannot write {path}: {e.strerror or e}") from None
    return str(path)
