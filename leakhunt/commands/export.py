"""`leakhunt export --pid PID... [--match REGEX] [--port N]`: Prometheus metrics for a fleet."""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from pathlib import Path

import click
from prometheus_client import start_http_server

from leakhunt import ui
from leakhunt.commands.options import (
    HOST,
    SPAN,
    duration_option,
    full_every_option,
    hint_children,
    interval_option,
    json_option,
    subprocesses_option,
)
from leakhunt.errors import BadInput
from leakhunt.export import Fleet, LedgerFeed, registry_for
from leakhunt.record import LOCK, SESSION, SNAPSHOTS
from leakhunt.units import format_duration

#: A full smaps read every 30 s at the default 5 s interval.
EXPORT_FULL_EVERY = 6


@click.command("export")
@click.option("--pid", "-p", "pids", type=int, multiple=True, help="a process to export (repeatable)")
@click.option(
    "--match",
    metavar="REGEX",
    help="also every process whose command line matches (followed as they come and go)",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=9464, show_default=True, help="HTTP port of /metrics"
)
@click.option(
    "--host",
    type=HOST,
    default="127.0.0.1",
    show_default=True,
    help="address to bind (0.0.0.0 exposes it to the network)",
)
@interval_option(default="5s")
@full_every_option(default=EXPORT_FULL_EVERY, records=False)
@click.option("--window", type=SPAN, default="15m", show_default=True, help="span the slopes are fitted over")
@click.option(
    "--top-groups",
    type=click.IntRange(0, 50),
    default=5,
    show_default=True,
    help="growing (class, path) groups exported per process",
)
@click.option(
    "--ledger",
    "ledgers",
    type=click.Path(file_okay=False),
    multiple=True,
    metavar="DIR",
    help="a `trace-mmap --record DIR` recording written beside the exporter: exports its "
    "callers' outstanding bytes for that pid (repeatable)",
)
@subprocesses_option
@duration_option(help="stop after this long (default: until Ctrl-C or SIGTERM)")
@json_option
def command(
    pids: tuple[int, ...],
    match: str | None,
    port: int,
    host: str,
    interval: float,
    full_every: int | None,
    window: float,
    top_groups: int,
    ledgers: tuple[str, ...],
    subprocesses: bool,
    duration: float | None,
    as_json: bool,
) -> None:
    """Serve Prometheus metrics of the processes given by --pid and/or --match.

    Per process: RSS by region class, the footprint (RSS plus held shared memory), the memory
    cgroup and /dev/shm, slopes over --window with their 95% bounds, leak and
    plateau verdicts, the top growing groups, and device memory (NVML) with its slope and
    verdict where there is a GPU. With --subprocesses, every process under each --pid too (each
    with its own series, labelled with its tree in leakhunt_process_tree) and each tree's totals
    with shared memory counted once (leakhunt_tree_rss_bytes). See docs/prometheus-alerts.yml and
    docs/grafana-dashboard.json.
    """
    if not pids and not match:
        raise BadInput("give --pid PID (repeatable) and/or --match REGEX")
    if match:
        try:
            re.compile(match)
        except re.error as e:
            raise BadInput(f"--match: not a regular expression: {e}") from None
    if subprocesses and not pids:
        raise BadInput("--subprocesses follows the trees under --pid: give --pid PID")
    fleet = Fleet(
        pids,
        match,
        interval,
        window,
        culprits=LedgerFeed(ledgers) if ledgers else None,
        subprocesses=subprocesses,
        full_every=full_every or EXPORT_FULL_EVERY,
    )
    for pid in pids:
        hint_children(pid, subprocesses)
    for directory in ledgers:  # a typo must not pass for a ledger still to come
        if not _recording_or_to_come(Path(directory)):
            raise BadInput(f"--ledger {directory}: not a leakhunt recording (no session.json)")
        if not Path(directory).exists():
            ui.err.print(
                f"note: --ledger {directory} does not exist yet: its callers appear once "
                f"`leakhunt trace-mmap --record {directory}` writes it",
                style="yellow",
            )
    fleet.sample_once()  # the first scrape already has figures
    try:
        server, _ = start_http_server(port, addr=host, registry=registry_for(fleet, top_groups))
    except OSError as e:
        raise BadInput(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    bound = server.server_address[1]
    console = ui.console_for(True)  # stdout is kept for --json; progress goes to stderr
    if host in ("0.0.0.0", "::") or not ipaddress.ip_address(_resolved(host)).is_loopback:
        console.print(
            f"warning: {host} is reachable from the network: anyone there can read every process's "
            "command line and memory figures (the default, 127.0.0.1, is not)",
            style="yellow",
        )
    console.print(
        f"serving http://{host}:{bound}/metrics — {len(fleet.view().targets)} process(es), "
        f"every {format_duration(interval)}",
        highlight=False,
    )
    console.print(
        f"device memory (NVML): {'sampled' if fleet.device else fleet.device_unavailable}",
        style="dim",
        highlight=False,
    )
    stop = threading.Event()
    began = time.monotonic()
    try:
        fleet.run(stop, duration)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        fleet.close()
    view = fleet.view()
    if as_json:
        ui.emit_json(
            ui.clean_json(
                {
                    "url": f"http://{host}:{bound}/metrics",
                    "ran_s": time.monotonic() - began,
                    "targets": [
                        {
                            "pid": t.pid,
                            "comm": t.comm,
                            "rss_bytes": last.rss,
                            "leak": bool(s and s.leak),
                            "device_memory_bytes": last.gpu_bytes,
                            "device_memory_leak": bool(s and s.device and s.device.verdict.leak),
                            **({"root": view.roots.get(t.pid)} if subprocesses else {}),
                        }
                        for t, s, last, _, _ in view.targets
                    ],
                    **(
                        {
                            "trees": [
                                {
                                    "root": tree.root.pid,
                                    "rss_bytes": tree.rss,
                                    "pss_bytes": tree.pss,
                                    "uss_bytes": tree.uss,
                                    "processes": tree.processes,
                                }
                                for tree in view.trees
                            ]
                        }
                        if subprocesses
                        else {}
                    ),
                    "device_memory": {
                        "available": fleet.device is not None,
                        "reason": fleet.device_unavailable,
                    },
                    "targets_discovered": view.discovered_total,
                    "targets_lost": view.lost_total,
                }
            )
        )


def _recording_or_to_come(directory: Path) -> bool:
    """A recording, one whose writer is creating it (its lock is there before session.json), or a
    directory that does not exist yet or is empty: trace-mmap started beside export fills it."""
    if not directory.is_dir():
        return not directory.exists()
    if (directory / SESSION).exists() or (directory / LOCK).exists():
        return True
    return not any(p.name != SNAPSHOTS for p in directory.iterdir())  # created, not yet written


def _resolved(host: str) -> str:
    """The address a host name binds to (the name itself when it is one)."""
    try:
        return socket.getaddrinfo(host, None)[0][4][0]
    except (OSError, IndexError):
        return host
