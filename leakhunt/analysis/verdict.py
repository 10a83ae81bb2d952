"""Is it a leak? A verdict over one memory series, with the evidence that decided it.

A leak is growth that is (1) significant: the lower end of the slope's confidence interval is
above a floor, and (2) still going: the last part of the window is still growing. Growth that
levels off (allocator caches, a KV cache or pool filled once, lazy initialisation) is a plateau,
not a leak. A warm-up at the start is discarded before either test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leakhunt.analysis.slope import NO_TREND, Trend, fit
from leakhunt.units import format_bytes, format_duration, format_rate

#: Below this (bytes/s, ~60 KiB/min) growth is noise for any serving process.
MIN_SLOPE = 1024.0
#: Samples needed after warm-up before anything is called a leak.
MIN_SAMPLES = 6
#: The tail that must still grow: the last 40% of the window...
TAIL_FRACTION = 0.4
#: ...at no less than this fraction of the whole window's rate.
TAIL_RATIO = 0.25
#: A series that had made this much of its total growth before the tail began has levelled off
#: (a straight line has made ~60% by then).
LEVELLED_PROGRESS = 0.85
#: Growth over the window must exceed this many times the scatter around the trend: Sen's interval
#: assumes independent residuals, which memory series (bursty, autocorrelated) are not.
NOISE_MULTIPLE = 3.0
#: Growth over the window below this is allocator granularity (glibc's mmap threshold and trim
#: threshold are 128 KiB), not evidence: a few seconds of a server's creep must not accuse it.
MIN_GROWTH = 256 * 1024.0


@dataclass(frozen=True)
class Verdict:
    leak: bool
    trend: Trend  # fitted after the warm-up
    tail: Trend  # the last TAIL_FRACTION of the window
    plateau: bool
    warmup_s: float
    reason: str  # one sentence a person can read


def default_warmup(duration_s: float) -> float:
    """10% of the run, at most 30 s: enough to skip start-up allocation, not to hide a leak."""
    return min(0.1 * duration_s, 30.0)


def judge(
    t, y, *, warmup_s: float | None = None, min_slope: float = MIN_SLOPE, confidence: float = 0.95
) -> Verdict:
    t = np.asarray(t, np.float64)
    y = np.asarray(y, np.float64)
    duration = float(t[-1] - t[0]) if len(t) else 0.0
    warmup = default_warmup(duration) if warmup_s is None else float(warmup_s)
    keep = t >= (t[0] + warmup) if len(t) else np.zeros(0, bool)
    tk, yk = t[keep], y[keep]
    trend = fit(tk, yk, confidence)
    if len(tk) < MIN_SAMPLES:
        return Verdict(
            False,
            trend,
            NO_TREND,
            False,
            warmup,
            f"not enough data: {len(tk)} samples after a {format_duration(warmup)} warm-up "
            f"(need {MIN_SAMPLES})",
        )
    rate = format_rate(trend.slope)
    noise = _noise(tk, yk, trend)
    cut = tk[0] + (1 - TAIL_FRACTION) * (tk[-1] - tk[0])
    progress = _progress_before_tail(tk, yk, cut)

    if not trend.lo > min_slope or trend.growth < max(NOISE_MULTIPLE * noise, MIN_GROWTH):
        # No steady growth; but growth that happened early and stopped is worth naming as such.
        grew = _median_growth(yk)
        if grew > max(NOISE_MULTIPLE * noise, min_slope * (tk[-1] - tk[0])) and progress >= LEVELLED_PROGRESS:
            return Verdict(
                False,
                trend,
                NO_TREND,
                True,
                warmup,
                f"grew {format_bytes(grew, signed=True)} early, then levelled off",
            )
        if trend.lo > min_slope and trend.growth < MIN_GROWTH:
            why = (
                f"growth of {format_bytes(trend.growth, signed=True)} over {format_duration(trend.duration_s)} "
                f"is too little to call (under {format_bytes(MIN_GROWTH)}); watch longer"
            )
        elif trend.lo > min_slope:
            why = (
                f"growth of {format_bytes(trend.growth, signed=True)} is within the noise "
                f"(±{format_bytes(noise)}); watch longer"
            )
        elif trend.slope > min_slope:
            why = f"growth of {rate} is not significant (interval {format_rate(trend.lo)} .. {format_rate(trend.hi)})"
        else:
            why = f"no significant growth ({rate})"
        return Verdict(False, trend, NO_TREND, False, warmup, why)

    in_tail = tk >= cut
    tail = fit(tk[in_tail], yk[in_tail], confidence) if in_tail.sum() >= 3 else NO_TREND
    # Levelled off: the tail grows clearly slower than half the overall rate, or it shows no
    # significant growth of its own and its best estimate is a small fraction of the overall
    # rate, or most of the window's growth was made before the tail began.
    levelled = (
        tail.samples < 3
        or tail.hi < 0.5 * trend.slope
        or (tail.lo <= min_slope and tail.slope < TAIL_RATIO * trend.slope)
        or progress >= LEVELLED_PROGRESS
    )
    if levelled:
        return Verdict(
            False,
            trend,
            tail,
            True,
            warmup,
            f"grew {format_bytes(yk[-1] - yk[0], signed=True)} then levelled off "
            f"(last {format_duration(tk[-1] - cut)}: {format_rate(tail.slope)})",
        )
    return Verdict(
        True,
        trend,
        tail,
        False,
        warmup,
        f"growing {rate} (95% interval {format_rate(trend.lo)} .. {format_rate(trend.hi)}) "
        f"over {format_duration(trend.duration_s)}, {trend.samples} samples",
    )


def _progress_before_tail(t: np.ndarray, y: np.ndarray, cut: float) -> float:
    """Share of the window's growth already made when the tail began, from medians (spike-proof)."""
    k = max(3, len(t) // 10)
    before_cut = y[t < cut]
    first, at_cut, last = np.median(y[:k]), np.median(before_cut[-k:]), np.median(y[-k:])
    if last <= first:
        return 1.0
    return float((at_cut - first) / (last - first))


def _noise(t: np.ndarray, y: np.ndarray, trend: Trend) -> float:
    """Robust scatter (1.4826 x MAD) of the samples around the fitted line, bytes."""
    residuals = y - (trend.intercept + trend.slope * t)
    return float(1.4826 * np.median(np.abs(residuals - np.median(residuals))))


def _median_growth(y: np.ndarray) -> float:
    k = max(3, len(y) // 10)
    return float(np.median(y[-k:]) - np.median(y[:k]))
