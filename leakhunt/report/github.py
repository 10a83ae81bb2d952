"""GitHub Actions output of a CI gate result: a workflow-command annotation (``::error``,
``::notice``) and a Markdown step summary appended to ``$GITHUB_STEP_SUMMARY``."""

from __future__ import annotations

import os
from collections.abc import Mapping

from leakhunt.ci import ERROR, FAIL, GateResult
from leakhunt.units import format_bytes, format_duration, format_rate

TITLE = "leakhunt ci"


def in_github_actions(env: Mapping[str, str] = os.environ) -> bool:
    return env.get("GITHUB_ACTIONS") == "true"


def _escape_data(text: str) -> str:
    # The runner's own escaping rules for a workflow command's message and properties.
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(result: GateResult) -> str:
    level = {FAIL: "error", ERROR: "error"}.get(result.exit_code, "notice")
    title = (
        f"{TITLE}: memory leak"
        if result.exit_code == FAIL
        else (f"{TITLE}: could not measure" if result.exit_code == ERROR else f"{TITLE}: no leak")
    )
    return f"::{level} title={_escape_property(title)}::{_escape_data(result.reason)}"


_ICON = {0: "✅ pass", 1: "❌ leak", 2: "⚠️ error"}


def step_summary(result: GateResult) -> str:
    """Markdown for the job's summary page."""
    lines = [
        f"### leakhunt ci — {_ICON[result.exit_code]}",
        "",
        result.reason,
        "",
        f"- target: `{result.target}`",
        f"- gate: {result.config.describe()}",
    ]
    s = result.summary
    if s is not None:
        t = s.rss.verdict.trend
        lines += [
            f"- RSS {format_bytes(s.rss.start)} → {format_bytes(s.rss.end)} "
            f"({format_bytes(s.rss.growth, signed=True)}) over {format_duration(s.duration_s)}, "
            f"{s.samples} samples",
            f"- slope {format_rate(t.slope)}, 95% interval [{format_rate(t.lo)} .. {format_rate(t.hi)}]",
            "",
            "| class | RSS | growth | slope |",
            "|---|---:|---:|---:|",
        ]
        for klass, c in sorted(s.classes.items(), key=lambda kv: -kv[1].growth):
            lines.append(
                f"| {klass.value} | {format_bytes(c.end)} | {format_bytes(c.growth, signed=True)} | "
                f"{format_rate(c.verdict.trend.slope)} |"
            )
        if s.groups:
            lines += ["", "| top growing group | class | growth |", "|---|---|---:|"]
            lines += [
                f"| `{g.label}` | {g.klass.value} | {format_bytes(g.growth, signed=True)} |"
                for g in s.groups[:5]
            ]
    lines += [f"- note: {n}" for n in result.notes]
    return "\n".join(lines) + "\n\n"


def publish(result: GateResult, env: Mapping[str, str] = os.environ) -> str | None:
    """Append the step summary when the runner asks for one; return the annotation line to print
    (None outside GitHub Actions)."""
    path = env.get("GITHUB_STEP_SUMMARY")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(step_summary(result))
    return annotation(result) if in_github_actions(env) else None
