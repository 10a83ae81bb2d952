"""A recording turned into a Report: the headline, then every section that has something to say.

Adding a section is one function ``(ReportData) -> Section | None`` put into SECTIONS; it returns
None when the recording has nothing for it. Renderers (html.py, markdown.py) draw whatever comes.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from leakhunt.analysis.device import device_finding, device_json, device_leak_only
from leakhunt.report import context_sections, device_sections, evidence_sections, memory_sections
from leakhunt.report.blocks import Callout, Headline, Report, Section, sentence
from leakhunt.report.recorded import ReportData
from leakhunt.units import format_bytes, format_duration, format_rate, format_share

SECTIONS: list[Callable[[ReportData], Section | None]] = [
    memory_sections.recording_state,
    memory_sections.where_memory_is,
    memory_sections.what_the_kernel_charges,
    device_sections.device_memory,
    evidence_sections.who_mapped_it,
    evidence_sections.outstanding_by_caller,
    evidence_sections.heap_versus_rss,
    memory_sections.what_grew,
    memory_sections.is_it_a_leak,
    memory_sections.processes,
    evidence_sections.no_tracer_data,
    context_sections.environment,
    context_sections.reproduce,
]


def build_report(data: ReportData) -> Report:
    sections = tuple(s for s in (_safely(make, data) for make in SECTIONS) if s is not None)
    return Report(headline(data), sections)


def _safely(make: Callable[[ReportData], Section | None], data: ReportData) -> Section | None:
    """A post-mortem must render even from a recording no section foresaw: a section that fails
    says so in its place instead of taking the whole report down."""
    try:
        return make(data)
    except Exception as e:  # noqa: BLE001 - any failure of one section, reported in the page
        title = make.__name__.replace("_", " ").capitalize()
        return Section(
            title,
            make.__name__,
            (Callout("warn", "This section could not be drawn", f"{type(e).__name__}: {e}"),),
        )


def _target_name(session: dict) -> str:
    cmdline = str(session.get("cmdline") or "")
    if not cmdline:
        return f"pid {session.get('pid', '?')}"
    first, _, rest = cmdline.partition(" ")
    name = os.path.basename(first)
    return f"{name} {rest}".strip()


def headline(data: ReportData) -> Headline:
    s = data.session
    m = data.memory
    title = f"Memory report: {_target_name(s)}"
    parts = [
        f"leakhunt {s.get('command', '?')}",
        f"pid {context_sections.pid_text(s)}",
        str(s.get("host", "")),
        context_sections.when(s.get("started")),
    ]
    if m is not None:
        parts.append(f"{format_duration(m.duration_s)}, {m.samples} samples")
    if not data.recording.complete:
        parts.append("incomplete recording")
    subtitle = " · ".join(p for p in parts if p)
    if m is None:
        if data.tracer is not None:
            t = data.tracer
            return Headline(
                title,
                subtitle,
                "info",
                "TRACE ONLY",
                f"No memory samples in this recording, only the tracer's: "
                f"{format_bytes(t.outstanding_bytes)} outstanding in {t.outstanding_mappings} mappings "
                f"at the end, {t.events} events, {t.lost_events} lost.",
                (),
            )
        return Headline(title, subtitle, "info", "NO DATA", "The recording holds no sample.", ())
    v = m.verdict
    if v.leak:
        tone, badge = "bad", "LEAK"
    elif device_leak_only(m):
        tone, badge = "bad", "DEVICE LEAK"
    elif v.plateau:
        tone, badge = "warn", "PLATEAU"
    elif v.reason.startswith("not enough data") or "noise" in v.reason:
        tone, badge = "info", "INCONCLUSIVE"
    else:
        tone, badge = "good", "NO LEAK"
    answer = sentence(v.reason)
    finding = device_finding(m)
    if finding:
        # A GPU leak leaves host RSS alone: its sentence leads when RSS has nothing to say.
        answer = (
            f"{sentence(finding)} Host RSS: {v.reason.rstrip('.')}."
            if not v.leak
            else f"{answer} {sentence(finding)}"
        )
    top = m.top_class()
    if v.leak and top is not None:
        answer += f" Most of it is {top.value} memory ({format_bytes(m.classes[top].growth, signed=True)})."
    if v.leak and m.hidden_shm:
        answer += (
            f" RSS grew only {format_bytes(m.rss.growth, signed=True)}: the rest is shared memory the "
            "process holds without touching it."
        )
    culprits = data.attribution.culprits if data.attribution else ()
    if culprits:
        answer += f" Top culprit: {culprits[0].title} ({format_share(culprits[0].share)} of the growth)."
    numbers = [
        (f"{m.main_label} at the end", format_bytes(m.main.end)),
        ("growth", format_bytes(m.main.growth, signed=True)),
        ("slope", format_rate(v.trend.slope)),
    ]
    if m.main_label != "RSS":
        numbers.append(("RSS growth", format_bytes(m.rss.growth, signed=True)))
    if top is not None:
        numbers.append((f"{top.value} growth", format_bytes(m.classes[top].growth, signed=True)))
    if m.device is not None:
        numbers.append(("device memory growth", format_bytes(m.device.growth, signed=True)))
    numbers.append(("observed", format_duration(m.duration_s)))
    return Headline(title, subtitle, tone, badge, answer, tuple(numbers))


def report_json(data: ReportData, report: Report) -> dict:
    """The --json document: what the report says, without the pictures."""
    return {
        "recording": str(data.recording.dir),
        "complete": data.recording.complete,
        "streams": data.recording.streams(),
        "verdict": report.headline.badge.lower().replace(" ", "_"),
        "answer": report.headline.answer,
        "sections": [s.title for s in report.sections],
        "plots": [f.name for f in report.figures()],
        "problems": list(data.problems),
        "summary": data.memory.to_json() if data.memory else None,
        "device_memory": device_json(data.memory, device_sections.device_unavailable(data)),
        "tracer_data": data.has_tracer_data,
        "heap_data": data.heap is not None,
    }
