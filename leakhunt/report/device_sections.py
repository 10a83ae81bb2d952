"""The report's device-memory section: NVML's per-process GPU memory, sampled beside smaps, drawn
against host RSS with its own slope and verdict. A recording without it says why in the
environment section instead (device_unavailable), so a report never leaves the reader guessing.
"""

from __future__ import annotations

import numpy as np

from leakhunt.analysis.device import NOT_SAMPLED, device_finding
from leakhunt.report import plots
from leakhunt.report.blocks import Callout, Facts, Figure, Para, Section, sentence
from leakhunt.report.recorded import ReportData
from leakhunt.units import format_bytes, format_duration, format_rate

#: Where commands put their ``device_memory`` object in summary.json: watch at the top level,
#: investigate under "memory", ci under "summary".
_SUMMARY_PLACES = ((), ("memory",), ("summary",))


def device_memory(data: ReportData) -> Section | None:
    m, h = data.memory, data.history
    if m is None or m.device is None:
        return None
    d, v = m.device, m.device.verdict
    t = np.asarray(h.t)
    blocks = []
    finding = device_finding(m)
    if finding:
        blocks.append(
            Callout(
                "bad",
                sentence(finding),
                "smaps and every host-side profiler miss this memory: it is on the GPU. Look "
                "for tensors kept per request (caches, lists of outputs, autograd graphs "
                "held by a reference).",
            )
        )
    blocks.append(
        Figure(
            "device-memory",
            plots.device_vs_rss(
                t, np.asarray(h.gpu, float), np.asarray(h.rss, float), v.trend, v.warmup_s, v.leak
            ),
            "Device memory the process uses according to NVML (summed over its GPUs) and host "
            "RSS, both as growth since the first sample; the dashed line is the device "
            "series' robust (Theil–Sen) trend after the warm-up.",
        )
    )
    interval = (
        f"{format_rate(v.trend.lo)} .. {format_rate(v.trend.hi)}"
        if np.isfinite(v.trend.lo) and np.isfinite(v.trend.hi)
        else "n/a"
    )
    blocks.append(
        Facts(
            (
                ("device memory at the end", format_bytes(d.end)),
                ("growth", format_bytes(d.growth, signed=True)),
                ("slope", format_rate(v.trend.slope)),
                ("95% interval", interval),
                ("verdict", "leak" if v.leak else "plateau" if v.plateau else "no leak"),
                ("fitted window", f"{format_duration(v.trend.duration_s)}, {v.trend.samples} samples"),
            )
        )
    )
    blocks.append(Para(sentence(v.reason)))
    return Section("Device memory", "device", tuple(blocks))


def device_unavailable(data: ReportData) -> str | None:
    """Why a recording has no device series (None when it has one): the reason its command
    wrote in summary.json, else 'not sampled'."""
    if data.memory is not None and data.memory.device is not None:
        return None
    summary = data.recording.summary or {}
    for place in _SUMMARY_PLACES:
        node = summary
        for key in place:
            node = node.get(key) if isinstance(node, dict) else None
        status = node.get("device_memory") if isinstance(node, dict) else None
        if isinstance(status, dict) and status.get("reason"):
            return str(status["reason"])
    return NOT_SAMPLED
