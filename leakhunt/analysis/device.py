"""Device memory (NVML) read beside host RSS: the status every command prints where device memory
would be, and the one sentence that reads the two series together (a GPU leak that smaps cannot
see: device memory grows while host RSS is flat).
"""

from __future__ import annotations

from leakhunt.analysis.summary import MemorySummary
from leakhunt.gpu import NvmlReader
from leakhunt.units import format_rate

#: The reason given when a command did not sample device memory and does not know why.
NOT_SAMPLED = "not sampled"


def open_nvml() -> tuple[NvmlReader | None, str | None]:
    """(reader, None) when NVML works here, else (None, why not in one line)."""
    nvml = NvmlReader.open()
    if isinstance(nvml, NvmlReader):
        return nvml, None
    return None, nvml.reason


def device_finding(summary: MemorySummary) -> str | None:
    """The sentence about device memory when it leaks, None when it does not (or was not sampled)."""
    device = summary.device
    if device is None or not device.verdict.leak:
        return None
    rate = format_rate(device.verdict.trend.slope)
    if summary.verdict.leak:
        return f"device memory grows too: {rate} (NVML)"
    return f"device memory grows {rate} (NVML) while host RSS is flat: tensors kept alive on the GPU"


def device_leak_only(summary: MemorySummary) -> bool:
    """Device memory leaks and host RSS does not: the leak every smaps-only view misses."""
    return summary.device is not None and summary.device.verdict.leak and not summary.verdict.leak


def device_json(summary: MemorySummary | None, unavailable: str | None = None) -> dict:
    """The ``device_memory`` object of a command's --json: the series and its verdict, or why
    there is none."""
    if summary is not None and summary.device is not None:
        v = summary.device.verdict
        return {
            "available": True,
            **summary.device.to_json(),
            "plateau": v.plateau,
            "verdict": v.reason,
            "finding": device_finding(summary),
        }
    return {"available": False, "reason": unavailable or NOT_SAMPLED}


def device_status_line(summary: MemorySummary | None, unavailable: str | None = None) -> str | None:
    """One line for human output when there is no device series (None when there is one: the
    series is shown instead)."""
    if summary is not None and summary.device is not None:
        return None
    return f"device memory (NVML): {unavailable or NOT_SAMPLED}"
