"""Report sections drawn from the sampler's streams alone, so every recording has them: the state
of the recording, where the memory is, what grew, and whether the growth is a leak."""

from __future__ import annotations

import math

import numpy as np

from leakhunt.report import plots
from leakhunt.report.blocks import Callout, Facts, Figure, Para, Section, Table, sentence
from leakhunt.report.recorded import ReportData, is_exit_note
from leakhunt.units import format_bytes, format_duration, format_rate

MAX_GROUP_LINES = 6


def _interval(trend) -> str:
    if not (math.isfinite(trend.lo) and math.isfinite(trend.hi)):
        return ""
    return f"[{format_rate(trend.lo).split()[0]} .. {format_rate(trend.hi)}]"


def _verdict_word(verdict) -> str:
    return "leak" if verdict.leak else ("plateau" if verdict.plateau else "")


def recording_state(data: ReportData) -> Section | None:
    blocks = []
    rec = data.recording
    if not rec.complete:
        blocks.append(
            Callout(
                "warn",
                "Incomplete recording",
                "leakhunt stopped before it wrote summary.json (it was killed, or the machine "
                "went down). Everything recorded up to the last sample is shown.",
            )
        )
    if data.target_died:
        stopped = (rec.summary or {}).get("stopped_because") or next(
            (n for n in data.notes if is_exit_note(n)), ""
        )
        blocks.append(Callout("warn", "The target exited during the run", str(stopped)))
    if data.memory is None:
        blocks.append(
            Callout(
                "info" if data.has_tracer_data else "bad",
                "No memory samples",
                "the recording holds no smaps sample of the target (watch, ci and investigate "
                "record them; trace-mmap alone does not).",
            )
        )
    for problem in data.problems:
        blocks.append(Callout("info", "Recording problem", problem))
    other = [n for n in data.notes if not is_exit_note(n)]
    if other:
        blocks.append(Table(("notes recorded during the run",), tuple((n,) for n in other), align="l"))
    return Section("About this recording", "recording", tuple(blocks)) if blocks else None


def where_memory_is(data: ReportData) -> Section | None:
    m, h = data.memory, data.history
    if m is None:
        return None
    t = np.asarray(h.t)
    classes = {c: np.asarray(h.classes[c], float) for c in m.classes}
    fig = Figure(
        "rss-by-class",
        plots.rss_by_class(t, classes, m.rss.verdict.warmup_s),
        "RSS of the target split by the kind of memory (region class), stacked. The class that "
        "grew most is on top.",
    )
    rows = [
        (
            "total",
            format_bytes(m.rss.start),
            format_bytes(m.rss.end),
            format_bytes(m.rss.growth, signed=True),
            format_rate(m.rss.verdict.trend.slope),
            _interval(m.rss.verdict.trend),
            _verdict_word(m.rss.verdict),
        )
    ]
    for klass, s in sorted(m.classes.items(), key=lambda kv: -kv[1].growth):
        rows.append(
            (
                klass.value,
                format_bytes(s.start),
                format_bytes(s.end),
                format_bytes(s.growth, signed=True),
                format_rate(s.verdict.trend.slope),
                _interval(s.verdict.trend),
                _verdict_word(s.verdict),
            )
        )
    table = Table(
        ("class", "first", "last", "growth", "slope", "95% interval", "verdict"), tuple(rows), align="lrrrrrl"
    )
    return Section("Where the memory is", "classes", (fig, table))


def what_the_kernel_charges(data: ReportData) -> Section | None:
    """Footprint, held shared memory, the memory cgroup and /dev/shm, when the recording has them."""
    m, h = data.memory, data.history
    if m is None or len(h.footprint) != len(h):
        return None
    if m.main_label == "RSS" and m.cgroup is None and m.dev_shm is None:
        return None
    t = np.asarray(h.t)

    def full(values: list[int]) -> np.ndarray | None:
        return np.asarray(values, float) if values and len(values) == len(h) else None

    blocks: list = []
    if m.hidden_shm:
        blocks.append(
            Callout(
                "bad",
                sentence(
                    f"The footprint grew {format_bytes(m.main.growth, signed=True)} while RSS grew "
                    f"{format_bytes(m.rss.growth, signed=True)}"
                ),
                "The difference is shared memory the process keeps alive without touching it (a "
                "receiver's mappings of buffers another process wrote). The memory cgroup charges "
                "it as shmem, /dev/shm fills with it, and no RSS graph shows it.",
            )
        )
    limit = m.cgroup_charge.limit if m.cgroup_charge else None
    blocks.append(
        Figure(
            "charges",
            plots.charges(
                t,
                np.asarray(h.footprint, float),
                np.asarray(h.rss, float),
                full(h.held) if any(h.held) else None,
                full(h.cgroup_usage),
                limit,
                full(h.dev_shm_used),
                m.verdict.warmup_s,
            ),
            "The footprint (private memory plus every shared object the process maps, counted "
            "whole), RSS, the held shared objects, the memory cgroup's charge and /dev/shm's fill. "
            "The cgroup and /dev/shm count every process in them, not only the target.",
        )
    )
    facts = [
        ("footprint", f"{format_bytes(m.main.start)} → {format_bytes(m.main.end)}"),
        ("footprint slope", f"{format_rate(m.verdict.trend.slope)} {_interval(m.verdict.trend)}"),
        ("RSS slope", format_rate(m.rss.verdict.trend.slope)),
    ]
    if m.shm is not None:
        facts.append(
            (
                "held shared memory",
                f"{format_bytes(m.shm.bytes)} in {m.shm.objects} objects ({m.shm.deleted_objects} deleted)",
            )
        )
        if m.shm.orphans:
            facts.append(
                ("/dev/shm files it does not map", f"{m.shm.orphans}, {format_bytes(m.shm.orphan_bytes)}")
            )
    if m.cgroup is not None:
        c = m.cgroup
        facts.append(
            (
                f"memory cgroup (v{c.version})",
                f"{c.path}: {format_bytes(c.usage_bytes)}"
                + (f" of {format_bytes(limit)}" if limit else ", no limit"),
            )
        )
        if c.stat:
            facts.append(("charged as", ", ".join(f"{k} {format_bytes(v)}" for k, v in c.stat.items())))
        if c.oom_kills is not None:
            facts.append(("OOM kills", str(c.oom_kills)))
        if m.cgroup_charge and m.cgroup_charge.time_to_limit_s is not None:
            facts.append(("limit reached in", f"~{format_duration(m.cgroup_charge.time_to_limit_s)}"))
    if m.dev_shm is not None:
        facts.append(
            ("/dev/shm", f"{format_bytes(m.dev_shm.used_bytes)} of {format_bytes(m.dev_shm.size_bytes)}")
        )
        if m.dev_shm_charge and m.dev_shm_charge.time_to_limit_s is not None:
            facts.append(("/dev/shm full in", f"~{format_duration(m.dev_shm_charge.time_to_limit_s)}"))
    blocks.append(Facts(tuple(facts)))
    return Section("What the kernel charges", "charges", tuple(blocks))


def what_grew(data: ReportData) -> Section | None:
    m, h = data.memory, data.history
    if m is None:
        return None
    blocks = []
    if m.groups:
        t = np.asarray(h.t)
        series = [
            (g.label, g.klass, np.asarray(h.group_series((g.klass, g.path)), float))
            for g in m.groups[:MAX_GROUP_LINES]
        ]
        blocks.append(
            Figure(
                "top-groups",
                plots.group_growth(t, series),
                "Growth of the mappings that grew most, grouped by class and path (all "
                "anonymous memory is one group).",
            )
        )
        blocks.append(
            Table(
                ("group", "class", "mappings", "RSS", "growth", "slope"),
                tuple(
                    (
                        g.label,
                        g.klass.value,
                        str(g.regions),
                        format_bytes(g.end),
                        format_bytes(g.growth, signed=True),
                        format_rate(g.verdict.trend.slope),
                    )
                    for g in m.groups
                ),
                align="llrrrr",
                code_columns=(0,),
            )
        )
    else:
        blocks.append(Para("No group of mappings grew during the run."))
    if m.regions:
        blocks.append(
            Table(
                ("address range", "class", "path", "RSS", "growth", ""),
                tuple(
                    (
                        f"{r.start:012x}-{r.end:012x}",
                        r.klass.value,
                        r.path or "",
                        format_bytes(r.rss),
                        format_bytes(r.growth, signed=True),
                        "new" if r.new else "",
                    )
                    for r in m.regions
                ),
                align="lllrrl",
                code_columns=(0, 2),
                caption="Address ranges that gained most RSS between the first and the last "
                "full snapshot (the addresses a tracer's mmap returns land in).",
            )
        )
    return Section("What grew", "growth", tuple(blocks))


def is_it_a_leak(data: ReportData) -> Section | None:
    m, h = data.memory, data.history
    if m is None:
        return None
    v = m.rss.verdict
    t, y = np.asarray(h.t), np.asarray(h.rss, float)
    tail = v.tail if v.tail.samples else None
    blocks = [
        Figure(
            "slope-fit",
            plots.slope_fit(t, y, v.trend, tail, v.warmup_s, v.leak),
            "Total RSS at each sample with its robust (Theil–Sen) trend and the band spanned by "
            "the slope's 95% confidence interval; the dashed line is the last part of the run, "
            "fitted alone to tell a leak from growth that levelled off.",
        ),
        Para(sentence(v.reason)),
        Facts(
            (
                ("slope", format_rate(v.trend.slope)),
                ("95% interval", _interval(v.trend) or "n/a"),
                ("last part of the run", format_rate(v.tail.slope) if v.tail.samples else "n/a"),
                ("fitted window", f"{format_duration(v.trend.duration_s)}, {v.trend.samples} samples"),
                ("warm-up ignored", format_duration(v.warmup_s)),
                ("leak floor", format_rate(data.session.get("max_slope_bytes_per_s") or 1024.0)),
            )
        ),
    ]
    # Classes that did not move would be empty rows: the table above lists them.
    rows = [
        (k, s.verdict.trend, s.verdict.leak)
        for k, s in sorted(m.classes.items(), key=lambda kv: -kv[1].growth)
        if s.verdict.trend.samples >= 3 and (s.growth or s.verdict.trend.slope)
    ]
    if rows:
        blocks.append(
            Figure(
                "class-rates",
                plots.class_rates(rows),
                "Each class's growth rate with its 95% interval; a class whose whole interval "
                "is above zero grows for sure.",
            )
        )
    return Section("Is it a leak?", "verdict", tuple(blocks))


def processes(data: ReportData) -> Section | None:
    """A recording of a process tree: the plots show the tree's totals, this each process."""
    if not data.processes:
        return None
    root = data.session.get("pid")
    rows = tuple(
        (
            str(p.pid) + (" (root)" if p.pid == root else ""),
            str(p.samples),
            format_bytes(p.first_rss),
            format_bytes(p.last_rss),
            format_bytes(p.last_rss - p.first_rss, signed=True),
            format_rate(p.slope),
            p.verdict,
        )
        for p in sorted(data.processes, key=lambda p: p.first_rss - p.last_rss)
    )
    return Section(
        "Processes in the tree",
        "processes",
        (
            Para(
                f"This recording followed {len(rows)} processes; the plots show their totals (shared pages "
                "counted once), this table each process, most growth first."
            ),
            Table(("pid", "samples", "first", "last", "growth", "slope", "verdict"), rows, align="lrrrrrl"),
        ),
    )
