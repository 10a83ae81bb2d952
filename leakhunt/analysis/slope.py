"""Robust growth rate of a memory series: Theil–Sen slope with a confidence interval.

Theil–Sen (the median of all pairwise slopes) shrugs off the spikes memory series are full of
(a GC pass, a transient buffer) where least squares would chase them. The interval is Sen's,
from scipy.stats.theilslopes. Long series are thinned to bucket medians first: the estimator is
O(n^2) in pairs, and a day of 1 s samples says nothing more about a trend than 600 medians do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import theilslopes

MAX_POINTS = 600


@dataclass(frozen=True)
class Trend:
    """A fitted slope in bytes per second with its confidence interval."""

    slope: float
    lo: float
    hi: float
    intercept: float
    samples: int
    duration_s: float
    first: float
    last: float
    confidence: float = 0.95

    @property
    def growth(self) -> float:
        """Growth explained by the trend over the fitted window, bytes."""
        return self.slope * self.duration_s

    def to_dict(self) -> dict:
        return {
            "slope_bytes_per_s": self.slope,
            "slope_interval": [self.lo, self.hi],
            "samples": self.samples,
            "duration_s": self.duration_s,
        }


NO_TREND = Trend(math.nan, math.nan, math.nan, math.nan, 0, 0.0, math.nan, math.nan)


def thin(t: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` bucket medians of a long series (the shape, not the noise)."""
    if len(t) <= max_points:
        return t, y
    edges = np.linspace(0, len(t), max_points + 1).astype(int)
    return (
        np.array([np.median(t[a:b]) for a, b in zip(edges[:-1], edges[1:])]),
        np.array([np.median(y[a:b]) for a, b in zip(edges[:-1], edges[1:])]),
    )


def fit(t, y, confidence: float = 0.95) -> Trend:
    """Theil–Sen fit of y (bytes) against t (seconds). Fewer than 3 points: NO_TREND."""
    t = np.asarray(t, np.float64)
    y = np.asarray(y, np.float64)
    if len(t) < 3 or np.ptp(t) <= 0:
        if len(t) == 0:
            return NO_TREND
        return Trend(
            math.nan, math.nan, math.nan, math.nan, len(t), float(np.ptp(t)), y[0], y[-1], confidence
        )
    tt, yy = thin(t, y)
    if np.ptp(yy) == 0:  # a flat line: theilslopes' interval degenerates, the answer is exact
        return Trend(0.0, 0.0, 0.0, float(yy[0]), len(t), float(t[-1] - t[0]), y[0], y[-1], confidence)
    res = theilslopes(yy, tt, alpha=confidence)
    return Trend(
        float(res.slope),
        float(res.low_slope),
        float(res.high_slope),
        float(res.intercept),
        len(t),
        float(t[-1] - t[0]),
        float(y[0]),
        float(y[-1]),
        confidence,
    )
