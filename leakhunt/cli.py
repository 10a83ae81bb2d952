"""The `leakhunt` command: a click group whose commands live one per module in leakhunt.commands.

Commands are imported only when invoked so that `leakhunt --help` and `leakhunt doctor` start
fast. Every failure is one line on stderr and exit code 2: library errors (LeakhuntError), the
operating system's (a full disk, a closed stdout, a permission) and, as "internal error", any
other (LEAKHUNT_DEBUG=1 prints its traceback). Exit code 1 belongs to ci's "leak found" alone.
SIGTERM is turned into a clean stop, as Ctrl-C. SIGINT stops it even when leakhunt was started
with SIGINT ignored (a background job of a non-interactive shell, `nohup`): Python leaves an
inherited SIG_IGN in place, and a supervisor's `kill -INT` would then be lost while the target
stays traced. bpftrace and perf take SIGINT the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import sys
import traceback

import click

from leakhunt import __version__
from leakhunt.errors import LeakhuntError
from leakhunt.text import one_line

COMMANDS = {
    "doctor": ("leakhunt.commands.doctor", "which backends work here, and why not"),
    "watch": ("leakhunt.commands.watch", "sample a process's memory and judge its growth"),
    "trace-mmap": ("leakhunt.commands.trace_mmap", "trace mmap/munmap and name who maps what"),
    "investigate": ("leakhunt.commands.investigate", "sampler + tracer + correlator: which library leaks"),
    "maps": ("leakhunt.commands.maps", "one classified snapshot of a process or a saved smaps"),
    "diff": ("leakhunt.commands.diff", "what grew between two snapshots"),
    "report": ("leakhunt.commands.report", "HTML and Markdown post-mortem from a recording"),
    "ci": ("leakhunt.commands.ci", "fail when memory grows faster than a limit"),
    "export": ("leakhunt.commands.export", "Prometheus metrics for a fleet"),
    "top": ("leakhunt.commands.top", "every process on the node ranked by footprint growth"),
    "demo": ("leakhunt.commands.demo", "reference server + load + investigate + report"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (module, _) in COMMANDS.items() if _module_exists(module)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = COMMANDS.get(name)
        if entry is None or not _module_exists(entry[0]):
            return None
        return importlib.import_module(entry[0]).command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _module_exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@click.group(
    cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="leakhunt")
def cli() -> None:
    """Find memory that leaks outside the heap of a serving process, and name the library."""


def _sigterm(signum, frame) -> None:
    # A clean stop: every command already handles Ctrl-C by detaching, keeping what it has and
    # printing its summary; SIGTERM (systemd, kubectl, timeout) gets the same treatment.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.stdout is None:  # started with its stdout closed: nowhere to say what it finds
        _say("leakhunt: error: stdout is closed")
        sys.exit(2)
    try:
        # Without standalone mode click *returns* the code of a click.exceptions.Exit raised by a
        # command (ci exits 1 that way) instead of raising it.
        code = cli.main(args=argv, prog_name="leakhunt", standalone_mode=False)
    except LeakhuntError as e:
        _say(f"leakhunt: error: {one_line(e)}")
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if e.exit_code not in (0, 1) else e.exit_code)
    except click.exceptions.Abort:
        click.echo("leakhunt: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("leakhunt: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except OSError as e:
        _say(
            f"leakhunt: error: {one_line(e.strerror or e)}"
            + (f": {one_line(e.filename)}" if e.filename else "")
        )
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, exit 2, never 1
        if os.environ.get("LEAKHUNT_DEBUG"):
            traceback.print_exc()
        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        at = f" at {os.path.basename(where.filename)}:{where.lineno}" if where else ""
        _say(
            f"leakhunt: internal error{at}: {type(e).__name__}: {one_line(e)} (LEAKHUNT_DEBUG=1 shows the traceback)"
        )
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def _say(line: str) -> None:
    """One line on stderr, even when stderr itself is the trouble."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
