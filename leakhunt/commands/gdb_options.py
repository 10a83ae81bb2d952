"""The gdb backend's command-line options, for every command that can trace with gdb: one
decorator adds them and hands the command ``gdb_extra``, ready for TraceOptions.extra.

    @click.command()
    @gdb_options
    def command(..., gdb_extra: dict): ... TraceOptions(extra={**gdb_extra})
"""

from __future__ import annotations

import functools
import os

import click

from leakhunt.commands.options import SPAN
from leakhunt.gdb.backend import DEFAULT_MAX_HITS, GDB_ENV, gdb_extra


def gdb_options(f):
    @functools.wraps(f)
    def command(
        *args,
        gdb_path: str | None,
        gdb_max_hits: int,
        gdb_time_budget: float | None,
        gdb_every: int,
        gdb_python_frames: bool,
        **kwargs,
    ):
        if gdb_path:
            # The backend's availability check is a class method that sees no options: it reads
            # the same variable, so `--backend gdb --gdb-path cuda-gdb` works where no plain gdb is.
            os.environ[GDB_ENV] = gdb_path
        extra = gdb_extra(
            gdb_path=gdb_path,
            max_hits=gdb_max_hits,
            time_budget=gdb_time_budget,
            every=gdb_every,
            python_frames=gdb_python_frames,
        )
        return f(*args, gdb_extra=extra, **kwargs)

    options = [
        click.option(
            "--gdb-path",
            default=None,
            metavar="PATH",
            help=f"gdb backend: the gdb to drive, e.g. cuda-gdb (default: ${GDB_ENV} or gdb)",
        ),
        click.option(
            "--gdb-max-hits",
            type=click.IntRange(min=1),
            default=DEFAULT_MAX_HITS,
            show_default=True,
            help="gdb backend: detach after this many breakpoint hits",
        ),
        click.option(
            "--gdb-time-budget",
            type=SPAN,
            default=None,
            help="gdb backend: detach after this long (30s, 5m); default: the duration",
        ),
        click.option(
            "--gdb-every",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="gdb backend: stop for 1 mmap in N (munmaps are never skipped)",
        ),
        click.option(
            "--gdb-python-frames/--no-gdb-python-frames",
            default=True,
            show_default=True,
            help="gdb backend: Python frames in the stacks of a CPython target",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command
