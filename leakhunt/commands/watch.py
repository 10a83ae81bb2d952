"""`leakhunt watch --pid PID`: a live, pmap -X-like view sorted by growth, and a verdict.

With --subprocesses the whole tree under PID is watched: every process with its own verdict,
and tree totals that count shared memory once (leakhunt.proc.tree).
"""

from __future__ import annotations

import click
from rich.text import Text

from leakhunt import ui
from leakhunt.analysis.device import device_finding, device_json, device_status_line
from leakhunt.commands.options import (
    duration_option,
    full_every_option,
    hint_children,
    interval_option,
    json_option,
    pid_option,
    record_option,
    session_writer,
    subprocesses_option,
    warmup_option,
)
from leakhunt.commands.options import full_every as resolve_full_every
from leakhunt.errors import LeakhuntError
from leakhunt.gpu import NvmlReader
from leakhunt.heap import HeapRun
from leakhunt.proc.target import open_target
from leakhunt.render.live import LiveView
from leakhunt.render.watch import render_watch
from leakhunt.units import format_duration
from leakhunt.watch import watch


@click.command("watch")
@pid_option()
@interval_option()
@duration_option()
@warmup_option
@full_every_option()
@subprocesses_option
@click.option(
    "--heap",
    is_flag=True,
    help="Python target: memray attached alongside (needs gdb or lldb), so "
    "the report shows the Python heap beside RSS",
)
@record_option
@json_option
def command(
    pid: int,
    interval: float,
    duration: float | None,
    warmup: float | None,
    full_every: int | None,
    subprocesses: bool,
    heap: bool,
    record_dir: str | None,
    as_json: bool,
) -> None:
    """Sample PID's memory every INTERVAL and judge its growth.

    Shows the footprint (RSS plus the shared memory it holds without touching it) and RSS with
    their slopes and confidence intervals, the memory cgroup and /dev/shm, a breakdown by region
    class, and the groups and address ranges that grow most. Ctrl-C ends it with a summary.
    """
    # A tree's shared pages are counted once from every process's snapshot: it reads them all.
    full_every = resolve_full_every(full_every, record_dir or subprocesses)
    target = open_target(pid)
    console = ui.console_for(as_json)
    hint_children(pid, subprocesses)
    writer = (
        session_writer(
            record_dir,
            "watch",
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
    live = LiveView(console)
    nvml = NvmlReader.open()
    gpu = nvml if isinstance(nvml, NvmlReader) else None
    heap_run = HeapRun(writer.dir if writer else None) if heap else None
    if heap_run:
        heap_run.attach(pid, duration)

    def on_sample(first: bool, view) -> None:
        if live.due(first):
            live.show(render_watch(view()))

    try:
        with live:
            result = watch(
                target, interval, duration, warmup, writer, gpu, full_every, subprocesses, on_sample
            )
    finally:
        if heap_run:
            heap_run.finish()
        if gpu:
            gpu.close()
    document, lost, summary = result.document, result.error, result.summary
    no_gpu = getattr(nvml, "reason", None)
    document["device_memory"] = device_json(summary, no_gpu)
    document.update(interval_s=interval, record=record_dir)
    if heap_run:
        document.update(heap_growth_bytes=heap_run.growth)
        if writer:
            heap_run.write(writer)
    if writer:
        if lost:
            writer.note(str(lost))
        writer.finish({"command": "watch", **document})
    if as_json:
        ui.emit_json(ui.clean_json(document))
    else:
        console.print(Text(f"summary — stopped: {result.stopped_because}", style="bold"))
        console.print(render_watch(result.view))
        finding = device_finding(summary)
        device_line = finding or device_status_line(summary, no_gpu)
        if device_line:
            console.print(Text(device_line, style="bold red" if finding else "dim"))
        if record_dir:
            console.print(
                Text(f"recorded in {record_dir} — render it with: leakhunt report {record_dir}", style="dim")
            )
    if lost:
        raise LeakhuntError(
            f"{lost} after {format_duration(summary.duration_s)} "
            f"({summary.samples} samples kept{', recorded' if record_dir else ''})"
        )
