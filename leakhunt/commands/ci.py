"""`leakhunt ci (--pid PID | -- CMD...) --max-slope 5MB/min`: the memory regression gate.

Exit 0 when the footprint (RSS plus the shared memory the process holds without touching it)
grows no faster than the limit, 1 when the lower bound of its slope exceeds it,
2 when the gate cannot measure (a command that fails to start, a pid that does not exist).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click
from rich.text import Text

from leakhunt import ui
from leakhunt.ci import ERROR, Gate, GateConfig, GateResult, error_result
from leakhunt.commands.options import (
    COMMAND_LINE,
    RATE,
    duration_option,
    hint_children,
    interval_option,
    json_option,
    record_option,
    session_writer,
    subprocesses_option,
    warmup_option,
)
from leakhunt.errors import BadInput, LeakhuntError
from leakhunt.heap import HeapRun
from leakhunt.record import SessionWriter, TreeRecorder
from leakhunt.render.ci import render
from leakhunt.report import github
from leakhunt.report.junit import junit_xml
from leakhunt.text import one_line


@click.command("ci", context_settings={"ignore_unknown_options": True})
@click.option("--pid", "-p", type=int, help="gate a running process")
@click.option("--max-slope", type=RATE, required=True, help="the growth limit, e.g. 5MB/min")
@click.option(
    "--max-device-slope",
    type=RATE,
    help="also fail when GPU memory (NVML) grows faster than this; an error where NVML cannot sample it",
)
@duration_option(default="60s", help="how long to sample")
@interval_option()
@warmup_option
@click.option(
    "--load",
    "load",
    type=COMMAND_LINE,
    metavar="CMD",
    help="a load generator to run alongside (one quoted command line)",
)
@subprocesses_option
@click.option(
    "--heap",
    is_flag=True,
    help="Python target: track its heap with memray (attach for --pid, "
    "run mode for a command) so the report shows the heap beside RSS",
)
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="write JUnit XML here")
@record_option
@json_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def command(
    pid: int | None,
    max_slope: float,
    max_device_slope: float | None,
    duration: float,
    interval: float,
    warmup: float | None,
    load: str | None,
    subprocesses: bool,
    heap: bool,
    junit_path: str | None,
    record_dir: str | None,
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Fail when memory grows faster than --max-slope.

    Either gate a running process (--pid) or start COMMAND (after --), sample it for --duration
    and stop it at the end. Exit 0: within the limit; 1: the lower bound of the footprint slope's
    95% interval exceeds it (the footprint is RSS plus the shared objects the process maps, each
    whole: pages it holds without touching count); 2: the gate could not measure.

    \b
      leakhunt ci --max-slope 5MB/min --duration 2m -- python -m myserver
      leakhunt ci --pid 1234 --max-slope 1MiB/min --junit leak.xml
    """
    if (pid is None) == (not command):
        raise BadInput("give either --pid PID or a command after --, not both (nor neither)")
    console = ui.console_for(as_json)
    if pid is not None:
        hint_children(pid, subprocesses)
    config = GateConfig(max_slope, duration, interval, warmup, max_device_slope)
    label = shlex.join(command) if command else f"pid {pid}"
    load_argv = load or None
    meta = {
        "pid": pid,
        "cmdline": label,
        "interval_s": interval,
        "max_slope_bytes_per_s": max_slope,
        "max_device_slope_bytes_per_s": max_device_slope,
        "subprocesses": subprocesses,
    }
    if heap:
        meta["heap_mode"] = "attach" if pid is not None else "run"
    writer = session_writer(record_dir, "ci", meta) if record_dir else None
    recorder = TreeRecorder(writer, follow=subprocesses) if writer else None
    try:
        # A started command's output goes to stderr so that --json keeps stdout one document.
        gate = Gate(
            config,
            subprocesses=subprocesses,
            on_tick=recorder,
            keep_raw=writer is not None,
            command_output=sys.stderr,
            heap=HeapRun(writer.dir if writer else None) if heap else None,
        )
        result = gate.run_pid(pid, load_argv) if pid is not None else gate.run_command(command, load_argv)
    except LeakhuntError as e:
        result = error_result(config, label, e)
        _publish(result, junit_path, writer, recorder, as_json, console)  # says the error once
        raise click.exceptions.Exit(ERROR) from None
    if writer and gate.heap:
        gate.heap.write(writer)
    _publish(result, junit_path, writer, recorder, as_json, console)
    if result.exit_code:
        raise click.exceptions.Exit(result.exit_code)


def _publish(
    result: GateResult,
    junit_path: str | None,
    writer: SessionWriter | None,
    recorder: TreeRecorder | None,
    as_json: bool,
    console,
) -> None:
    line = github.publish(result)
    if line:
        # Workflow commands are read from the step's output; stderr when stdout is the JSON.
        click.echo(line, err=as_json)
    if writer:
        if recorder:
            recorder.flush_last()
        writer.finish({"command": "ci", **ui.clean_json(result.to_json())})
    if as_json:
        ui.emit_json(ui.clean_json(result.to_json()))
    elif result.exit_code != ERROR or result.summary is not None:
        console.print(render(result))
    if writer and not as_json:
        console.print(
            Text(f"recorded in {writer.dir} — render it with: leakhunt report {writer.dir}", style="dim")
        )
    if result.exit_code == ERROR:  # said on stderr too, where a pipeline's log looks for errors
        click.echo(f"leakhunt: error: {one_line(result.reason)}", err=True)
    if junit_path:  # last: a path that cannot be written costs the JUnit file, not the verdict
        try:
            Path(junit_path).write_bytes(junit_xml(result))
        except OSError as e:
            raise BadInput(f"--junit {junit_path}: {e.strerror or e}") from None
