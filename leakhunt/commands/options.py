"""Options and parameter types shared by the commands, so each reads and behaves the same."""

from __future__ import annotations

import click

from leakhunt import ui
from leakhunt.proc.tree import children_hint
from leakhunt.units import parse_duration, parse_rate, parse_size


class _Parsed(click.ParamType):
    def __init__(self, name: str, parse) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


DURATION = _Parsed("duration", parse_duration)
SIZE = _Parsed("size", parse_size)
RATE = _Parsed("rate", parse_rate)


def pid_option(required: bool = True):
    return click.option("--pid", "-p", type=int, required=required, help="process to look at")


def json_option(f):
    return click.option(
        "--json", "as_json", is_flag=True, help="print one JSON document on stdout instead of tables"
    )(f)


def duration_option(
    default: str | None = None, help: str = "how long to run (30s, 5m); default: until Ctrl-C"
):
    return click.option("--duration", "-d", type=DURATION, default=default, help=help)


def interval_option(default: str = "1s"):
    return click.option(
        "--interval", "-i", type=DURATION, default=default, show_default=True, help="time between samples"
    )


def record_option(f):
    return click.option(
        "--record",
        "record_dir",
        type=click.Path(file_okay=False),
        help="append everything seen to this session directory (leakhunt report DIR)",
    )(f)


def warmup_option(f):
    return click.option(
        "--warmup",
        type=DURATION,
        default=None,
        help="ignore growth in the first part of the run (default: 10%, at most 30s)",
    )(f)


def subprocesses_option(f):
    return click.option(
        "--subprocesses",
        is_flag=True,
        help="follow the whole process tree under --pid (children that come later too)",
    )(f)


def hint_children(pid: int, subprocesses: bool) -> None:
    """One line on stderr when PID has children that the command, without --subprocesses, leaves out."""
    if not subprocesses and (hint := children_hint(pid)):
        ui.err.print(f"[yellow]hint:[/] {hint}")
