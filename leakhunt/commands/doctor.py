"""`leakhunt doctor [--install]`: one table of what works here and why not."""

from __future__ import annotations

import click
from rich.text import Text

from leakhunt import doctor, ui
from leakhunt.commands.options import json_option
from leakhunt.errors import LeakhuntError
from leakhunt.render.doctor import render


@click.command("doctor")
@click.option(
    "--install", is_flag=True, help="fix what can be fixed: apt packages, tracefs, kernel headers, BCC"
)
@click.option(
    "--with",
    "extra",
    multiple=True,
    metavar="PACKAGE",
    help="more apt packages to install with --install (the test suite adds its own)",
)
@click.option("--quiet", "-q", is_flag=True, help="print only what --install did and what is still broken")
@json_option
def command(install: bool, extra: tuple[str, ...], quiet: bool, as_json: bool) -> None:
    """Check root and capabilities, ptrace_scope, tracefs, tracepoints, BTF, kprobes, uprobes,
    bpftrace, BCC, kernel headers, gdb, perf, memray and NVML, and each tracer backend."""
    console = ui.console_for(as_json)
    log = None
    if install:
        with console.status("installing") as status:
            log = doctor.install(list(extra), progress=lambda step: status.update(f"installing: {step}"))
    checks = doctor.run_checks()
    if as_json:
        ui.emit_json(
            {
                "checks": [c.to_json() for c in checks],
                "install": {"actions": log.actions, "failures": log.failures} if log else None,
                "ok": all(c.ok or c.optional for c in checks),
            }
        )
    else:
        if log:
            for action in log.actions:
                console.print(Text.assemble(("✔", "green"), f" {action}"))
            for failure in log.failures:
                console.print(Text.assemble(("✘", "red"), f" {failure}"))
            if not log.actions and not log.failures and not quiet:
                console.print(
                    Text("nothing to install: everything leakhunt can fix is in place", style="dim")
                )
        shown = [c for c in checks if not quiet or not (c.ok or c.optional)]
        if shown:
            console.print(render(shown))
    if log and log.failures:
        raise LeakhuntError(f"doctor --install could not fix everything: {log.failures[0]}")
