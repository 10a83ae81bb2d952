"""Options and parameter types shared by the commands, so each reads and behaves the same."""

from __future__ import annotations

import ipaddress
import re
import shlex

import click
from rich.text import Text

from leakhunt import ui
from leakhunt.units import parse_duration, parse_rate, parse_size


class _Parsed(click.ParamType):
    """A value parsed by one of leakhunt.units' parsers, refused at parse time when it cannot
    work (``positive``: a zero interval or budget would loop or stop at once)."""

    def __init__(self, name: str, parse, positive: bool = False) -> None:
        self.name = name
        self._parse = parse
        self._positive = positive

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            parsed = self._parse(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if self._positive and not parsed > 0:
            self.fail(f"{value!r}: must be more than zero", param, ctx)
        return parsed


class _CommandLine(click.ParamType):
    """One quoted command line, split the way a shell would, refused when it cannot be."""

    name = "command line"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            argv = shlex.split(value)
        except ValueError as e:
            self.fail(f"{value!r}: {e}", param, ctx)
        if not argv:
            self.fail("an empty command line", param, ctx)
        return argv


class _Host(click.ParamType):
    """An address to bind: an IP address or a host name as RFC 1123 spells one."""

    name = "host"
    _LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")

    def convert(self, value, param, ctx):
        try:
            ipaddress.ip_address(value)
            return value
        except ValueError:
            pass
        labels = value.rstrip(".").split(".")
        if len(value) > 253 or not all(self._LABEL.fullmatch(label) for label in labels):
            self.fail(f"{value!r} is neither an IP address nor a host name", param, ctx)
        return value


DURATION = _Parsed("duration", parse_duration)
#: A duration that must be more than zero: intervals, budgets, runs.
SPAN = _Parsed("duration", parse_duration, positive=True)
SIZE = _Parsed("size", parse_size)
RATE = _Parsed("rate", parse_rate)
COMMAND_LINE = _CommandLine()
HOST = _Host()


def pid_option(required: bool = True):
    return click.option("--pid", "-p", type=int, required=required, help="process to look at")


def json_option(f):
    return click.option(
        "--json", "as_json", is_flag=True, help="print one JSON document on stdout instead of tables"
    )(f)


def duration_option(
    default: str | None = None, help: str = "how long to run (30s, 5m); default: until Ctrl-C"
):
    return click.option("--duration", "-d", type=SPAN, default=default, help=help)


def interval_option(default: str = "1s"):
    return click.option(
        "--interval", "-i", type=SPAN, default=default, show_default=True, help="time between samples"
    )


#: --full-every when it is not given: a recording wants every sample's snapshot.
FULL_EVERY = 10
FULL_EVERY_RECORDING = 1


def full_every_option(default: int = FULL_EVERY, records: bool = True):
    when = f"{default}; {FULL_EVERY_RECORDING} with --record or --subprocesses" if records else str(default)
    return click.option(
        "--full-every",
        type=click.IntRange(1, 10_000),
        default=None,
        help=f"a full smaps sample every N samples (up to 8N while they find nothing new), and "
        f"whenever RSS or the address space moved by 8 MiB (or 2%) since the last; the others read "
        f"/proc/PID/status only, without the target's mmap_lock (1: every sample full) [default: {when}]",
    )


def full_every(value: int | None, every_snapshot: object, default: int = FULL_EVERY) -> int:
    """--full-every as given, else the default for a run that wants every snapshot (a recording,
    a tree) or not."""
    if value is not None:
        return value
    return FULL_EVERY_RECORDING if every_snapshot else default


def record_option(f):
    f = click.option(
        "--append",
        is_flag=True,
        expose_value=False,
        callback=lambda ctx, param, value: ctx.meta.__setitem__("leakhunt.append", value),
        help="with --record: add this run to a recording that exists, as a new session",
    )(f)
    return click.option(
        "--record",
        "record_dir",
        type=click.Path(file_okay=False),
        help="record everything seen into this new directory (leakhunt report DIR)",
    )(f)


def session_writer(record_dir: str, command: str, meta: dict | None = None):
    """The recording of a command's --record (and --append) options."""
    ctx = click.get_current_context(silent=True)
    append = bool(ctx and ctx.meta.get("leakhunt.append"))
    from leakhunt.record import SessionWriter  # noqa: PLC0415 - not on the paths that do not record

    return SessionWriter(record_dir, command, meta, append=append)


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
    from leakhunt.proc.tree import children_hint  # noqa: PLC0415 - psutil and the tree sampler

    if not subprocesses and (hint := children_hint(pid)):
        ui.err.print(Text.assemble(("hint:", "yellow"), f" {hint}"))
