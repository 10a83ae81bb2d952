"""`leakhunt demo [--leak MODE]`: reference server + load + investigate + report, no arguments needed."""

from __future__ import annotations

from pathlib import Path

import click
from rich.text import Text

from leakhunt import ui
from leakhunt.commands.options import DURATION, json_option
from leakhunt.demo import LEAK_MODES, PROCESS_LAYOUTS, run_demo
from leakhunt.render.investigate import render_progress, render_result


@click.command("demo")
@click.option(
    "--leak",
    type=click.Choice(LEAK_MODES),
    default="mmap-hook",
    show_default=True,
    help="the leak planted in the reference server",
)
@click.option(
    "--duration",
    "-d",
    type=DURATION,
    default="60s",
    show_default=True,
    help="the longest the investigation runs (it stops once confident)",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="leakhunt-demo",
    show_default=True,
    help="where the recording and the report go",
)
@click.option(
    "--processes",
    type=click.Choice(PROCESS_LAYOUTS),
    default="api,engine",
    show_default=True,
    help="api,engine: an API-server process and its engine child, as production servers run (the "
    "leak lives in the child); api: everything in one process",
)
@json_option
def command(leak: str, duration: float, out: str, processes: str, as_json: bool) -> None:
    """Start the paged-attention reference server with a planted leak, drive it with load,
    investigate it (the whole process tree), and write the post-mortem report. Leaves no process
    behind."""
    console = ui.console_for(as_json)
    with console.status("starting") as status:

        def progress(step: str) -> None:
            status.update(step)
            console.print(Text(f"· {step}", style="dim"))

        def on_update(inv, evaluation) -> None:
            status.update(render_progress(inv.progress()))

        result = run_demo(
            leak, Path(out), duration, progress=progress, on_update=on_update, processes=processes
        )
    if as_json:
        ui.emit_json(ui.clean_json(result.to_json()))
        return
    console.print(render_result(result.investigation))
    if result.culprit_pid is not None and result.culprit_pid != result.server_pid:
        which = "its engine process" if result.culprit_pid == result.engine_pid else "a process under it"
        console.print(
            Text(
                f"found in pid {result.culprit_pid}, {which}: the demo was given pid {result.server_pid}, "
                "the server's API process, and followed its subprocesses",
                style="bold",
            )
        )
    if result.pool_sentence():
        console.print(Text(result.pool_sentence(), style="yellow"))
    if result.load:
        console.print(
            Text(
                f"load: {result.load.get('completed', '?')} requests completed, "
                f"{result.load.get('failed', 0)} failed, "
                f"{result.load.get('output_throughput', 0):.0f} output tokens/s",
                style="dim",
            )
        )
    console.print(
        Text.assemble(
            "report: ",
            (str(result.html), "bold"),
            f" (and {result.markdown}); recording: {result.out / 'recording'}",
        )
    )
