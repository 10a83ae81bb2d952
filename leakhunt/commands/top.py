"""`leakhunt top`: every process on the node ranked by how fast its footprint grows.

The first question of an incident is "which process?", asked before anyone knows a pid. top
answers it from the kernel's counters (proc.node: no page-table walk per process), with the
container and pod each process belongs to, and hands off to `investigate --pid`.
"""

from __future__ import annotations

import math
import re
import time

import click
import numpy as np
from rich.table import Table
from rich.text import Text

from leakhunt import ui
from leakhunt.analysis.slope import thin
from leakhunt.analysis.verdict import MIN_GROWTH, MIN_SLOPE, judge
from leakhunt.commands.options import duration_option, interval_option, json_option
from leakhunt.errors import BadInput
from leakhunt.proc.node import NodeSampler, ProcessTrack
from leakhunt.proc.sampler import Pace
from leakhunt.render.live import LiveView
from leakhunt.text import one_line
from leakhunt.units import format_bytes, format_duration

#: Rows in the live table and the final one (--json has every process).
SHOWN = 20
#: Points of a process's series the ranking fits (bucket medians of longer ones).
RANK_POINTS = 120


def judged(track: ProcessTrack) -> dict:
    """One process's line. Every process is ranked at every refresh, so the robust verdict runs
    on at most RANK_POINTS bucket medians, and only for a series that moved more than the verdict's
    own growth floor (MIN_GROWTH: anything less cannot be a leak); the others get a least-squares
    slope, without an interval. (Theil-Sen over an hour of 5 s samples for 500 processes would
    cost seconds per refresh.)"""
    t, fp = thin(np.asarray(track.t, float), np.asarray(track.footprint, float), RANK_POINTS)
    if len(fp) >= 3 and np.ptp(fp) <= MIN_GROWTH:
        return _line(track, float(np.polyfit(t, fp, 1)[0]), [math.nan, math.nan], False)
    v = judge(t, fp, warmup_s=0.0, min_slope=MIN_SLOPE)
    slope = v.trend.slope if v.trend.samples >= 3 else 0.0
    return _line(track, slope if slope == slope else 0.0, v.trend.interval, v.leak)


def _line(track: ProcessTrack, slope: float, interval: list[float], leak: bool) -> dict:
    return {
        "pid": track.pid,
        "nspid": track.nspid,
        "command": track.command,
        "container": track.place.container,
        "pod": track.place.pod,
        "cgroup": track.place.cgroup,
        "rss_bytes": int(track.rss[-1]) if track.rss else 0,
        "footprint_bytes": int(track.footprint[-1]) if track.footprint else 0,
        "held_shm_bytes": track.held,
        "footprint_slope_bytes_per_s": slope,
        "slope_interval": interval,
        "leak": leak,
        "samples": len(track.t),
    }


def ranked(sampler: NodeSampler) -> list[tuple[dict, ProcessTrack]]:
    rows = [(judged(track), track) for track in sampler.tracks.values()]
    rows.sort(key=lambda r: (not r[0]["leak"], -r[0]["footprint_slope_bytes_per_s"]))
    return rows


def render(sampler: NodeSampler, elapsed: float, duration: float | None) -> Table:
    rows = ranked(sampler)
    leaking = sum(1 for doc, _ in rows if doc["leak"])
    table = Table(
        title=(
            f"leakhunt top · {len(rows)} processes · {format_duration(elapsed)}"
            + (f" / {format_duration(duration)}" if duration else "")
            + f" · {leaking} leaking"
        ),
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    for col, justify in (
        ("pid", "right"),
        ("ns pid", "right"),
        ("container / pod", "left"),
        ("command", "left"),
        ("RSS", "right"),
        ("footprint", "right"),
        ("slope /min", "right"),
        ("", "left"),
        ("trend", "left"),
    ):
        table.add_column(col, justify=justify, no_wrap=True, max_width=30 if col == "command" else None)
    for doc, track in rows[:SHOWN]:
        where = doc["container"] or ""
        if doc["pod"]:
            where = f"pod {doc['pod'][:8]}/{where}" if where else f"pod {doc['pod'][:8]}"
        table.add_row(
            str(doc["pid"]),
            str(doc["nspid"]) if doc["nspid"] != doc["pid"] else "",
            where,
            Text(one_line(doc["command"])[:30]),
            format_bytes(doc["rss_bytes"]),
            format_bytes(doc["footprint_bytes"]),
            ui.rate_text(doc["footprint_slope_bytes_per_s"], leak=doc["leak"]),
            ui.verdict_badge(doc["leak"]) if doc["leak"] else Text(""),
            Text(ui.sparkline(list(track.footprint), 16), style="red" if doc["leak"] else "cyan"),
        )
    return table


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
    sampler = NodeSampler(pattern, cgroup)
    live = LiveView(console)
    pace = Pace(interval, duration)
    elapsed = 0.0
    began = time.monotonic()
    try:
        with live:
            for _ in pace:
                elapsed = time.monotonic() - began
                sampler.tick(elapsed)
                if live.due(first=sampler.tick_no == 1):
                    live.show(render(sampler, elapsed, duration))
    except KeyboardInterrupt:
        pass
    rows = ranked(sampler)
    if as_json:
        ui.emit_json(
            ui.clean_json(
                {
                    "command": "top",
                    "duration_s": elapsed,
                    "interval_s": interval,
                    "ticks": sampler.tick_no,
                    "processes": [doc for doc, _ in rows],
                    "ended": [t.pid for t in sampler.ended],
                }
            )
        )
        return
    console.print(render(sampler, elapsed, duration))
    top = next((doc for doc, _ in rows if doc["leak"]), None)
    if top is not None:
        console.print(Text(f"next: leakhunt investigate --pid {top['pid']}", style="bold"))
    elif not rows:
        console.print(Text("no process matched", style="dim"))
