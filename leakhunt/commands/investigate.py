"""`leakhunt investigate --pid PID [--subprocesses]`: which library leaks, in which process, how
fast, with which stack, and what to do."""

from __future__ import annotations

import time

import click
from rich.live import Live
from rich.text import Text

from leakhunt import ui
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
from leakhunt.investigate import Evaluation, InvestigateOptions, Investigation
from leakhunt.proc.target import open_target
from leakhunt.render.investigate import render_progress, render_result
from leakhunt.trace.backend import BACKENDS
from leakhunt.units import format_duration

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
            live.update(render_progress(inv.progress()), refresh=True)

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
