"""The lines every command shows about what the kernel charges beyond RSS: the footprint the
verdict runs on, held shared memory, the memory cgroup and /dev/shm (watch, investigate, ci)."""

from __future__ import annotations

from rich.text import Text

from leakhunt import ui
from leakhunt.analysis.summary import ChargeSummary, MemorySummary, SeriesSummary
from leakhunt.text import one_line
from leakhunt.units import format_bytes, format_duration, format_rate


def series_line(label: str, series: SeriesSummary, values: list[int], reason: bool = True) -> Text:
    v = series.verdict
    text = Text(f"{label} ", style="bold")
    text.append(format_bytes(series.end), style="bold")
    text.append("  ")
    text.append_text(ui.growth_text(series.growth))
    text.append("  slope ")
    text.append_text(ui.rate_text(v.trend.slope, v.trend.lo, v.trend.hi, v.leak))
    text.append("  ")
    text.append_text(ui.verdict_badge(v.leak, v.plateau))
    if values:
        text.append("  " + ui.sparkline(values, 32), style="red" if v.leak else "cyan")
    if reason:
        text.append(f"\n{v.reason}", style="dim")
    return text


def _time_to(charge: ChargeSummary | None, word: str) -> str:
    if charge is None or charge.time_to_limit_s is None:
        return ""
    return f", {word} in ~{format_duration(charge.time_to_limit_s)} at {format_rate(charge.series.verdict.trend.slope)}"


def charge_lines(summary: MemorySummary) -> list[Text]:
    """Held shared memory, the memory cgroup and /dev/shm, one line each (those that exist)."""
    lines: list[Text] = []
    shm = summary.shm
    if shm is not None and (shm.objects or shm.orphans):
        text = Text("held shared memory ", style="bold")
        text.append(format_bytes(shm.bytes), style="bold")
        text.append(
            f" in {shm.objects} object{'s' if shm.objects != 1 else ''}"
            f" ({shm.deleted_objects} deleted, {format_bytes(shm.rss)} of it in RSS)"
        )
        if summary.held is not None:
            text.append("  ")
            text.append_text(ui.growth_text(summary.held.growth))
            text.append("  ")
            text.append_text(ui.rate_text(summary.held.verdict.trend.slope, leak=summary.held.verdict.leak))
        if shm.orphans:
            text.append(
                f"\n/dev/shm files this process does not map: {shm.orphans} ({format_bytes(shm.orphan_bytes)})",
                style="dim",
            )
        if summary.held_objects is not None and len(summary.held_objects):
            top = sorted(summary.held_objects.by_pattern().items(), key=lambda kv: -kv[1][0])[:3]
            for pattern, (b, n, d) in top:
                text.append(
                    f"\n  {one_line(pattern)[:60]}: {n} object{'s' if n != 1 else ''}, {format_bytes(b)}",
                    style="dim",
                )
                if d:
                    text.append(f" ({d} deleted)", style="dim")
        lines.append(text)
    cg = summary.cgroup
    if cg is not None:
        text = Text(f"memory cgroup (v{cg.version}) ", style="bold")
        text.append(one_line(cg.path or "/")[:60], style="cyan")
        text.append(f"  {format_bytes(cg.usage_bytes)}")
        limit = summary.cgroup_charge.limit if summary.cgroup_charge else cg.limit_bytes
        text.append(f" of {format_bytes(limit)} limit" if limit else " (no limit)")
        parts = [f"{k} {format_bytes(v)}" for k, v in cg.stat.items()]
        if parts:
            text.append(f"  ({', '.join(parts)})", style="dim")
        if cg.oom_kills:
            text.append(f"  OOM kills {cg.oom_kills}", style="bold red")
        until = _time_to(summary.cgroup_charge, "limit")
        if until:
            text.append(until, style="bold red")
        lines.append(text)
    fs = summary.dev_shm
    if fs is not None:
        text = Text("/dev/shm ", style="bold")
        text.append(f"{format_bytes(fs.used_bytes)} of {format_bytes(fs.size_bytes)}")
        until = _time_to(summary.dev_shm_charge, "full")
        if until:
            text.append(until, style="bold red")
        lines.append(text)
    return lines


def memory_lines(
    summary: MemorySummary, rss: list[int], footprint: list[int], label: str = "RSS"
) -> list[Text]:
    """The verdict's series first (the footprint when shared objects add to RSS), RSS beside it."""
    if summary.main_label == "footprint":
        return [
            series_line("footprint", summary.main, footprint),
            series_line(label, summary.rss, rss, reason=False),
        ]
    return [series_line(label, summary.rss, rss)]
