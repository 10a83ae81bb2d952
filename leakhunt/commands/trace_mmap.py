"""`leakhunt trace-mmap --pid PID`: who maps memory and does not give it back, live, by caller.

The work is leakhunt.trace.session.TraceSession's; what --record writes is described there.
"""

from __future__ import annotations

import math
import time

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
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
from leakhunt.trace.backend import BACKENDS, TraceOptions
from leakhunt.trace.faults import FaultTracer, FaultView, MappedBy, by_toucher, toucher_json
from leakhunt.trace.faults_bpftrace import BpftraceFaultTracer, fault_source
from leakhunt.trace.session import BackendChoice, CallerView, TraceSession, choose_backend
from leakhunt.trace.tree_trace import adopt_existing
from leakhunt.units import format_bytes, format_duration

REFRESH_S = 1.0
TOP = 15


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
            live.update(render(s, choice, duration, width=console.width, faults=fault_tracer), refresh=True)

    if show_live:
        live.start()
    try:
        why = session.run(duration, on_step)
    finally:
        if show_live:
            live.stop()
        if fault_tracer is not None:
            fault_tracer.stop()
    document = trace_document(session, choice, record_dir)
    if fault_tracer is not None:
        view = fault_tracer.view()
        document["faults"] = {
            "seen": view.seen,
            "sampled": view.sampled,
            "given_back_pages": view.given_back if view.netted else None,
            "by_caller": [toucher_json(*row) for row in by_toucher(view, mapped_by(session))[:TOP]],
        }
    if writer:
        writer.finish({"command": "trace-mmap", **document})
    if as_json:
        ui.emit_json(ui.clean_json(document))
    else:
        console.print(render(session, choice, duration, final=True, width=console.width, faults=fault_tracer))
        if record_dir:
            console.print(
                Text(f"recorded in {record_dir} — render it with: leakhunt report {record_dir}", style="dim")
            )
    if why == "target exited":
        # The trace is the evidence and it is complete up to the exit: printed above, and the
        # exit code says the run ended early (2, as every command whose target exits mid-run).
        ui.err.print(
            f"leakhunt: pid {pid} exited after {format_duration(session.elapsed)}; "
            f"kept what was traced ({document['events']} calls{', recorded' if record_dir else ''})",
            highlight=False,
            soft_wrap=True,
        )
        raise click.exceptions.Exit(2)


def trace_document(session: TraceSession, choice: BackendChoice, record_dir: str | None) -> dict:
    stats = session.backend.stats
    callers = session.callers()
    return {
        "command": "trace-mmap",
        "pid": session.target.pid,
        "nspid": list(session.target.nspid),
        "cmdline": session.target.cmdline,
        "backend": choice.name,
        "backends_unavailable": choice.unavailable,
        "duration_s": round(session.elapsed, 3),
        "stopped_because": session.stopped_because,
        "events": stats.events,
        "events_by_kind": session.ledger.kernel_syscalls,
        "streamed_events": session.streamed,
        "lost_events": stats.lost_events,
        # A reader that fell behind: the calls it never applied, and how much of the run the
        # figures cover (null: all of it).
        "backlog_events": stats.backlog,
        "covered_s": None
        if stats.complete_until is None
        else round(stats.complete_until - session.started_wall, 3),
        "filtered_events": stats.filtered,
        # of memory mapped before the trace, or of holes: decided in the kernel or in the ledger
        "untracked_unmaps": session.ledger.unmatched_unmaps + stats.untracked,
        "outstanding_bytes": sum(c.totals.outstanding_bytes for c in callers),
        "outstanding_mappings": sum(c.totals.mappings for c in callers),
        "by_caller": [caller_json(c) for c in callers],
        "notes": list(stats.notes),
        "backend_details": session.backend.details(),
        "record": record_dir,
    }


def caller_json(view: CallerView) -> dict:
    c = view.totals
    return {
        "library": c.library,
        "symbol": c.symbol,
        "caller": c.label,
        "frame": str(c.caller) if c.caller else None,
        "stack": [str(f) for f in c.stack.frames] if c.stack else [],
        "stack_partial": c.stack.partial if c.stack else True,
        "outstanding_bytes": c.outstanding_bytes,
        "mappings": c.mappings,
        "count": c.count,
        "mapped_bytes": c.mapped_bytes,
        "unmapped_bytes": c.unmapped_bytes,
        "rate_bytes_per_s": None if math.isnan(view.rate) else view.rate,
    }


def _header(session: TraceSession, choice: BackendChoice, duration: float | None, final: bool) -> Text:
    stats = session.backend.stats
    elapsed = session.elapsed
    text = Text()
    if final:
        text.append(f"summary — stopped: {session.stopped_because}\n", style="bold")
    text.append("leakhunt trace-mmap ", style="bold")
    text.append(f"{session.target.describe()}\n", style="cyan")
    clock = format_duration(elapsed) + (f" / {format_duration(duration)}" if duration and not final else "")
    rate = stats.events / elapsed if elapsed > 0 else 0.0
    text.append(
        f"{clock} · backend {choice.name} · {stats.events} calls ({rate:,.0f}/s) · "
        f"{session.streamed} to user space · ",
        style="dim",
    )
    text.append(f"{stats.lost_events} lost", style="bold red" if stats.lost_events else "dim")
    if stats.untracked:
        text.append(f" · {stats.untracked} unmaps of untracked memory (decided in the kernel)", style="dim")
    if stats.filtered:
        text.append(f" · {stats.filtered} below --min-size", style="dim")
    if stats.backlog:
        covered = (stats.complete_until or session.started_wall) - session.started_wall
        text.append(
            f"\nreader behind: {stats.backlog} calls not applied yet; the figures cover the first "
            f"{format_duration(max(0.0, covered))} of {format_duration(elapsed)}",
            style="bold yellow",
        )
    return text


def _table(callers: list[CallerView], width: int) -> Table:
    table = Table(
        title="outstanding by caller (library!function past the libc wrapper)",
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    wide = width >= 100  # mapped/unmapped totals only where they fit
    columns = [("outstanding", 11), ("share", 5), ("/min", 9), ("maps", 5), ("calls", 6)]
    columns += [("mapped", 9), ("unmapped", 9)] if wide else []
    table.add_column("caller", no_wrap=True, overflow="ellipsis", ratio=1, min_width=16)
    for col, min_width in columns:
        table.add_column(col, justify="right", no_wrap=True, min_width=min_width)
    total = sum(c.totals.outstanding_bytes for c in callers) or 1
    for view in callers[:TOP]:
        c = view.totals
        rate = Text("…", style="dim") if math.isnan(view.rate) else ui.growth_text(view.rate * 60)
        row = [
            c.label,
            ui.growth_text(c.outstanding_bytes),
            f"{100 * c.outstanding_bytes / total:.0f}%",
            rate,
            str(c.mappings),
            str(c.count),
        ]
        row += [format_bytes(c.mapped_bytes), format_bytes(c.unmapped_bytes)] if wide else []
        table.add_row(*row)
    if not callers:
        table.add_row(Text("no mapping calls yet", style="dim"), *[""] * len(columns))
    return table


def _top_stack(callers: list[CallerView]) -> Text:
    if not callers or not callers[0].totals.stack or not callers[0].totals.outstanding_bytes:
        return Text("")
    c = callers[0].totals
    text = Text(f"stack of {c.label}", style="bold")
    text.append(" (partial)" if c.stack.partial else "", style="dim")
    for frame in c.stack.frames:
        text.append(f"\n  {frame}")
    return text


def render(
    session: TraceSession,
    choice: BackendChoice,
    duration: float | None,
    final: bool = False,
    width: int = 80,
    faults: FaultTracer | BpftraceFaultTracer | None = None,
) -> Group:
    callers = session.callers()
    parts = [
        _header(session, choice, duration, final),
        Text(""),
        _table(callers, width),
        Text(""),
        _top_stack(callers),
    ]
    total = sum(c.totals.outstanding_bytes for c in callers)
    parts.insert(
        1,
        Text(
            f"outstanding {format_bytes(total)} in {sum(c.totals.mappings for c in callers)} "
            "mappings made while tracing",
            style="bold",
        ),
    )
    if faults is not None:
        parts += [Text(""), _fault_table(faults.view(), mapped_by(session))]
    for note in session.backend.stats.notes:
        parts.append(Text(f"note: {note}", style="yellow"))
    return Group(*parts)


def mapped_by(session: TraceSession) -> MappedBy:
    """The traced mappings still held, for naming the allocator that mapped faulted pages."""
    info = session.ledger.site_info
    return MappedBy(
        (o.pid, o.start, o.end, info.get(o.site, (None, None))[1]) for o in session.ledger.outstanding()
    )


def _fault_table(view: FaultView, mapping: MappedBy | None = None) -> Table:
    sampled = ", sampled and scaled" if view.sampled else ""
    held = (
        f"pages faulted in and still held, by the code above the allocator ({view.seen} faults seen, "
        f"{view.given_back} pages given back since{sampled})"
    )
    if not view.netted:
        held = f"pages faulted in, by the code above the allocator ({view.seen} faults; bpftrace: not netted)"
    table = Table(
        title=held,
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    for col, justify in (("caller", "left"), ("allocator", "left"), ("bytes", "right"), ("pages", "right")):
        table.add_column(col, justify=justify)
    rows = by_toucher(view, mapping)[:TOP]
    for row in rows:
        doc = toucher_json(*row)
        table.add_row(
            Text(f"{doc['library']}!{doc['symbol']}"),
            ", ".join(doc["allocators"]),
            format_bytes(doc["bytes"]),
            str(doc["pages"]),
        )
    if not rows:
        table.add_row(Text("no page faults yet", style="dim"), "", "", "")
    return table
