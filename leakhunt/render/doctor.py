"""`leakhunt doctor`'s table: each check, whether it works here, and the fix."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from leakhunt import doctor


def render(checks: list[doctor.Check]) -> Table:
    table = Table(title="leakhunt doctor", title_justify="left")
    table.add_column("")
    table.add_column("check")
    table.add_column("status", overflow="fold")
    table.add_column("needed by", style="dim")
    table.add_column("fix", overflow="fold")
    for c in checks:
        mark = (
            Text("✔", style="green")
            if c.ok
            else Text("–" if c.optional else "✘", style="yellow" if c.optional else "red")
        )
        table.add_row(mark, Text(c.name), Text(c.detail), Text(c.needed_by), Text(c.fix))
    return table
