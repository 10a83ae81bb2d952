"""`leakhunt ci`'s verdict: the badge, the gated series and classes, notes."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from leakhunt import ui
from leakhunt.analysis.device import device_status_line
from leakhunt.ci import ERROR, FAIL, GateResult
from leakhunt.render.charges import charge_lines
from leakhunt.units import format_bytes


def render(result: GateResult) -> Group | Text:
    badge = {
        0: Text(" PASS ", style="black on green"),
        FAIL: Text(" LEAK ", style="bold white on red"),
        ERROR: Text(" ERROR ", style="bold white on yellow"),
    }[result.exit_code]
    head = Text.assemble("leakhunt ci ", badge, " ", (result.target, "cyan"), "\n", result.reason)
    s = result.summary
    table = Table(box=None, pad_edge=False)
    for col, justify in (
        ("class", "left"),
        ("RSS", "right"),
        ("growth", "right"),
        ("slope /min [95% interval]", "right"),
    ):
        table.add_column(col, justify=justify)
    if s is None:
        return head
    rows = (
        [("footprint (gated)", s.main), ("total RSS", s.rss)] if s.main_label != "RSS" else [("total", s.rss)]
    )
    if s.held is not None:
        rows.append(("held shared memory", s.held))
    for label, series in rows:
        t = series.verdict.trend
        table.add_row(
            label,
            format_bytes(series.end),
            ui.growth_text(series.growth),
            ui.rate_text(t.slope, t.lo, t.hi, series.verdict.leak and series is s.main),
        )
    for klass, c in sorted(s.classes.items(), key=lambda kv: -kv[1].growth):
        table.add_row(
            klass.value,
            format_bytes(c.end),
            ui.growth_text(c.growth),
            ui.rate_text(c.verdict.trend.slope, c.verdict.trend.lo, c.verdict.trend.hi),
        )
    if result.heap_growth is not None:
        table.add_row("python heap", "", ui.growth_text(result.heap_growth), Text("(memray)", style="dim"))
    if s.device is not None:
        d = s.device.verdict
        table.add_row(
            "device (NVML)",
            format_bytes(s.device.end),
            ui.growth_text(s.device.growth),
            ui.rate_text(d.trend.slope, d.trend.lo, d.trend.hi, d.leak),
        )
    for note in result.notes:
        table.add_row(Text(f"note: {note}", style="dim"), "", "", "")
    no_device = device_status_line(s, result.device_unavailable)
    return Group(head, table, *charge_lines(s), *([Text(no_device, style="dim")] if no_device else []))
