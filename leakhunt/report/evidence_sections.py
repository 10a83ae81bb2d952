"""Report sections drawn from evidence beyond the sampler: the Python heap (memray), the mmap
tracers' events and ledger, and the correlator's culprits with their stacks and remedies. Each
says plainly when its data is absent and how to get it."""

from __future__ import annotations

import math

import numpy as np

from leakhunt.heap import aligned_growth
from leakhunt.report import plots
from leakhunt.report.blocks import Callout, Code, Facts, Figure, Para, Section, Table, sentence
from leakhunt.report.recorded import ReportData
from leakhunt.units import format_bytes, format_rate, format_share


def _pid(data: ReportData) -> str:
    return str(data.session.get("pid") or "PID")


def _is_python(data: ReportData) -> bool:
    return "python" in str(data.session.get("cmdline", "")).split(" ", 1)[0]


def heap_versus_rss(data: ReportData) -> Section | None:
    heap, h = data.heap, data.history
    if heap is None:
        if not _is_python(data):
            return None
        return Section(
            "Python heap versus RSS",
            "heap",
            (
                Callout(
                    "info",
                    "No Python heap data in this recording",
                    "The target is a Python program: run the gate with --heap (memray alongside) to see the heap "
                    "next to RSS; the gap between them is what no heap profiler can see.",
                ),
            ),
        )
    if not len(h) or len(heap.t) < 2:
        return None
    t, rss_growth, heap_growth = aligned_growth(np.asarray(h.t), np.asarray(h.rss, float), heap)
    if len(t) < 2:
        return None
    outside = rss_growth[-1] - heap_growth[-1]
    share = outside / rss_growth[-1] if rss_growth[-1] > 0 else math.nan
    tone = "bad" if rss_growth[-1] > 0 and share > 0.5 else "info"
    sentence = (
        f"RSS grew {format_bytes(rss_growth[-1], signed=True)} while memray saw the Python heap grow "
        f"{format_bytes(heap_growth[-1], signed=True)}: {format_bytes(max(outside, 0))}"
        + (f" ({format_share(share)}) of the growth" if math.isfinite(share) else "")
        + " is memory a heap profiler cannot see (raw mmap syscalls, shared memory, driver mappings)."
    )
    blocks = [
        Figure(
            "heap-vs-rss",
            plots.heap_vs_rss(t, rss_growth, heap_growth),
            f"Growth of RSS and of the heap memray tracked ({heap.mode} mode) from the moment "
            "tracking began.",
        ),
        Callout(tone, "Outside the heap" if tone == "bad" else "Heap and RSS", sentence),
    ]
    if (data.recording.dir / "memray.bin").exists():
        blocks.append(
            Para(f"The memray capture is kept: memray flamegraph {data.recording.dir / 'memray.bin'}")
        )
    return Section("Python heap versus RSS", "heap", tuple(blocks))


def no_tracer_data(data: ReportData) -> Section | None:
    """Placed late: without tracer data the memory sections are the story."""
    if data.attribution is not None and data.attribution.culprits:
        return None
    blocks = []
    if not data.has_tracer_data:
        blocks.append(
            Callout(
                "info",
                "No tracer data in this recording",
                "Nothing here says which code mapped the memory. Record the mmap tracer and "
                f"the correlator with: leakhunt investigate --pid {_pid(data)} --record NEW_DIR",
            )
        )
    else:
        blocks.append(
            Callout(
                "info",
                "No culprit verdict in this recording",
                "The tracer ran but the correlator did not (trace-mmap records the ledger; "
                f"investigate joins it with the regions that grew): leakhunt investigate --pid {_pid(data)}",
            )
        )
    if data.tracer is not None:
        t = data.tracer
        blocks.append(
            Facts(
                (
                    ("events traced", str(t.events)),
                    ("events lost", str(t.lost_events)),
                    (
                        "outstanding at the end",
                        f"{format_bytes(t.outstanding_bytes)} in {t.outstanding_mappings} mappings",
                    ),
                    ("backend", str(data.session.get("backend", "")) or "not recorded"),
                )
            )
        )
    if data.event_counts:
        blocks.append(
            Table(
                ("event", "count"),
                tuple(sorted((k, str(v)) for k, v in data.event_counts.items())),
                caption="Memory syscalls recorded one by one in this recording.",
            )
        )
    return Section("Who mapped it", "culprits", tuple(blocks))


def who_mapped_it(data: ReportData) -> Section | None:
    """Placed early: when the correlator named culprits they are the answer."""
    a = data.attribution
    if a is None or not a.culprits:
        return None
    cs = a.culprits
    blocks = [
        Callout("bad", sentence(a.sentence())),
        Figure(
            "attribution",
            plots.attribution([c.title for c in cs], [c.bytes for c in cs], a.unexplained),
            "Growth each caller's outstanding mappings explain (mapped, never unmapped, inside the "
            "regions that grew), and what no traced mapping explains.",
        ),
        Para(f"The culprits below explain {format_share(a.explained_fraction)} of the growth."),
        Table(
            ("caller", "bytes", "slope", "share of growth", "evidence"),
            tuple(
                (c.title, format_bytes(c.bytes), format_rate(c.slope), format_share(c.share), c.evidence)
                for c in cs
            ),
            align="lrrrl",
            code_columns=(0,),
        ),
    ]
    for c in cs:
        if c.known and c.known.explanation:
            blocks.append(Para(f"{c.title}: {c.known.explanation}"))
        if c.stack:
            blocks.append(
                Code(
                    "\n".join(c.stack) + ("\n... (partial stack)" if c.stack_partial else ""),
                    caption=f"stack of {c.title}, innermost frame first",
                )
            )
        if c.known and c.known.remedies:
            blocks.append(Facts(tuple(("remedy", r) for r in c.known.remedies)))
    return Section("Who mapped it", "culprits", tuple(blocks))


def outstanding_by_caller(data: ReportData) -> Section | None:
    callers = data.callers
    if callers is None or len(callers.t) < 2:
        return None
    rows = tuple(
        (caller, format_bytes(callers.bytes[-1, i]), format_bytes(callers.bytes[:, i].max()))
        for i, caller in enumerate(callers.callers)
    )
    return Section(
        "Outstanding bytes by caller",
        "ledger",
        (
            Figure(
                "outstanding-by-caller",
                plots.outstanding_by_caller(callers.t, callers.callers, callers.bytes),
                "Bytes mapped and not yet unmapped, by the caller past the libc wrapper, over the run.",
            ),
            Table(("caller", "outstanding at the end", "peak"), rows, code_columns=(0,)),
        ),
    )
