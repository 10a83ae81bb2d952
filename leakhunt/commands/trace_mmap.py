"""`leakhunt trace-mmap --pid PID`: who maps memory and does not give it back, live, by caller.

The work is leakhunt.trace.session.TraceSession's; what --record writes is described there.
"""

from __future__ import annotations

import time

import click
from rich.live import Live
from rich.text import Text

from leakhunt import ui
from leakhunt.commands.gdb_options import gdb_options
from leakhunt.commands.options import (
    SIZE,
    duration_option,
    hint_children,
    json_option,
    pid_option,
    record_option,
    session_writer,
)
from leakhunt.errors import BackendUnavailable
from leakhunt.proc.target import open_target
from leakhunt.proc.tree import descendants
from leakhunt.render.trace import render_trace
from leakhunt.trace.backend import BACKENDS, TraceOptions
from leakhunt.trace.faults_bpftrace import fault_source
from leakhunt.trace.session import TraceSession, choose_backend
from leakhunt.trace.summary import summarize_trace
from leakhunt.trace.tree_trace import adopt_existing
from leakhunt.units import format_duration

REFRESH_S = 1.0


@click.command("trace-mmap")
@pid_option()
@click.option(
    "--backend",
    "-b",
    type=click.Choice(["auto", *BACKENDS]),
    default="auto",
    show_default=True,
    help="tracer: auto picks the first that works here (bcc, bpftrace, gdb)",
)
@duration_option()
@click.option(
    "--follow",
    "--subprocesses",
    "follow",
    is_flag=True,
    help="trace the whole tree under PID: the processes there now and those forked later",
)
@click.option("--min-size", type=SIZE, default="0", help="ignore mmap/munmap smaller than this (e.g. 64K)")
@click.option(
    "--all-events",
    is_flag=True,
    help="send every call to user space (and --record) instead of pairing mmap/munmap in the kernel; "
    "costs more at high rates",
)
@click.option(
    "--faults",
    is_flag=True,
    help="also count the pages each caller faults in and still holds: growth that needs no mmap "
    "(allocators committing what they reserved), by the code above the allocator (BCC; with "
    "--backend bpftrace, faults counted without netting out the pages given back)",
)
@record_option
@json_option
@gdb_options
def command(
    pid: int,
    backend: str,
    duration: float | None,
    follow: bool,
    min_size: int,
    all_events: bool,
    faults: bool,
    record_dir: str | None,
    as_json: bool,
    gdb_extra: dict,
) -> None:
    """Trace PID's mmap, munmap, mremap, brk, shmat/shmdt and memfd_create, and show the memory
    still mapped, by caller (the library and function past the libc wrapper).

    Ctrl-C ends it with a summary.
    """
    target = open_target(pid)
    hint_children(pid, follow)
    choice = choose_backend(backend)
    console = ui.console_for(as_json)
    console.print(Text(choice.explain(), style="dim"))
    options = TraceOptions(
        follow=follow,
        existing=descendants(pid) if follow else (),
        min_length=min_size,
        extra={"stream_all": all_events, **gdb_extra},
    )
    meta = {"pid": pid, "nspid": list(target.nspid), "cmdline": target.cmdline, "backend": choice.name}
    writer = session_writer(record_dir, "trace-mmap", meta) if record_dir else None
    session = TraceSession(target, choice.cls(target, options), writer)
    session.start()
    if follow:
        session.backend.stats.notes.extend(adopt_existing(session))
    fault_tracer = None
    if faults:
        fault_tracer = fault_source((pid, *(descendants(pid) if follow else ())), choice.name)
        try:
            fault_tracer.start()
        except BackendUnavailable as e:
            session.stop()
            raise BackendUnavailable(e.backend, f"--faults: {e.reason}", e.fix) from None
    console.print(
        Text(
            f"tracing {target.describe()}{' and its subprocesses' if follow else ''} with "
            f"{choice.name}; Ctrl-C stops",
            style="dim",
        )
    )

    live = Live(console=console, auto_refresh=False, transient=True, redirect_stdout=False)
    show_live = console.is_terminal
    last = [0.0]

    def on_step(s: TraceSession) -> None:
        now = time.monotonic()
        if show_live and now - last[0] >= REFRESH_S:
            last[0] = now
            summary = summarize_trace(s, choice, record_dir, fault_tracer)
            live.update(render_trace(summary, duration, width=console.width), refresh=True)

    if show_live:
        live.start()
    try:
        why = session.run(duration, on_step)
    finally:
        if show_live:
            live.stop()
        if fault_tracer is not None:
            fault_tracer.stop()
    summary = summarize_trace(session, choice, record_dir, fault_tracer)
    document = summary.to_json()
    if writer:
        writer.finish(document)
    if as_json:
        ui.emit_json(ui.clean_json(document))
    else:
        console.print(render_trace(summary, duration, final=True, width=console.width))
        if record_dir:
            console.print(
                Text(f"recorded in {record_dir} — render it with: leakhunt report {record_dir}", style="dim")
            )
    if why == "target exited":
        # The trace is the evidence and it is complete up to the exit: printed above, and the
        # exit code says the run ended early (2, as every command whose target exits mid-run).
        ui.err.print(
            f"leakhunt: pid {pid} exited after {format_duration(session.elapsed)}; "
            f"kept what was traced ({summary.events} calls{', recorded' if record_dir else ''})",
            highlight=False,
            soft_wrap=True,
        )
        raise click.exceptions.Exit(2)
