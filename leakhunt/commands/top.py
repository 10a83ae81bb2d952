"""`leakhunt top`: every process on the node ranked by how fast its footprint grows.

The first question of an incident is "which process?", asked before anyone knows a pid. top
answers it from the kernel's counters (proc.node: no page-table walk per process), with the
container and pod each process belongs to, and hands off to `investigate --pid`.
"""

from __future__ import annotations

import re

import click
from rich.text import Text

from leakhunt import ui
from leakhunt.commands.options import duration_option, interval_option, json_option
from leakhunt.errors import BadInput
from leakhunt.proc.node import NodeSampler
from leakhunt.render.live import LiveView
from leakhunt.render.top import render_top
from leakhunt.top import ranked, top


@click.command("top")
@interval_option("5s")
@duration_option()
@click.option("--match", "match", default=None, help="only processes whose command line matches this regex")
@click.option(
    "--cgroup",
    default=None,
    help="only processes in this cgroup (a path as /proc/PID/cgroup shows it) or under it",
)
@json_option
def command(
    interval: float, duration: float | None, match: str | None, cgroup: str | None, as_json: bool
) -> None:
    """Rank every process on the node by how fast its footprint grows.

    The footprint is RSS plus the shared memory a process holds without touching it, read from
    the kernel's counters (no page-table walk). Each row names the container and Kubernetes pod
    from the cgroup path; take the leaking pid to `leakhunt investigate --pid PID`.

    \b
      leakhunt top --interval 5s --duration 2m
      leakhunt top --match 'vllm|sglang' --json
    """
    try:
        pattern = re.compile(match) if match else None
    except re.error as e:
        raise BadInput(f"--match: not a regular expression: {e}") from None
    if as_json and duration is None:
        raise BadInput("--json needs --duration: the ranking is printed once, at the end")
    console = ui.console_for(as_json)
    live = LiveView(console)

    def on_tick(sampler: NodeSampler, elapsed: float) -> None:
        if live.due(first=sampler.tick_no == 1):
            live.show(render_top(ranked(sampler), elapsed, duration))

    with live:
        found = top(interval, duration, pattern, cgroup, on_tick)
    if as_json:
        ui.emit_json(ui.clean_json(found.to_json()))
        return
    console.print(render_top(found.lines, found.elapsed_s, duration))
    leaking = next((line for line in found.lines if line.leak), None)
    if leaking is not None:
        console.print(Text(f"next: leakhunt investigate --pid {leaking.pid}", style="bold"))
    elif not found.lines:
        console.print(Text("no process matched", style="dim"))
