"""Robust growth rate of a memory series: Theil–Sen slope with a confidence interval.

Theil–Sen (the median of all pairwise slopes) shrugs off the spikes memory series are full of
(a GC pass, a transient buffer) where least squares would chase them. The interval is Sen's
(1968, eq. 2.6), computed as scipy.stats.theilslopes computes it (tests/test_slope.py holds the
two to the same answers): written here in numpy because importing scipy.stats costs a watch left
running for hours 68 MB of RSS, half of its budget. Long series are thinned to bucket medians
first: the estimator is O(n^2) in pairs, and a day of 1 s samples says nothing more about a trend
than 600 medians do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

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

    @property
    def interval(self) -> list[float]:
        """[lo, hi]: the JSON documents' ``slope_interval``."""
        return [self.lo, self.hi]


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


def _tie_term(values: np.ndarray) -> float:
    """Sum of k(k-1)(2k+5) over the groups of k equal values (k >= 2): the ties' share of the
    variance of Kendall's statistic."""
    _, k = np.unique(values, return_counts=True)
    k = k[k > 1].astype(np.float64)
    return float(np.sum(k * (k - 1) * (2 * k + 5)))


def theil_sen(y: np.ndarray, x: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(slope, intercept, low slope, high slope): the median of the pairwise slopes, the intercept
    median(y) - slope * median(x), and Sen's confidence interval from the ranks of the slopes."""
    dx = x[:, np.newaxis] - x
    dy = y[:, np.newaxis] - y
    forward = dx > 0
    slopes = np.sort(dy[forward] / dx[forward])
    slope = float(np.median(slopes))
    intercept = float(np.median(y) - slope * np.median(x))
    alpha = 1.0 - confidence if confidence > 0.5 else confidence
    z = NormalDist().inv_cdf(alpha / 2)
    n, count = len(y), len(slopes)
    variance = (n * (n - 1) * (2 * n + 5) - _tie_term(x) - _tie_term(y)) / 18.0
    if variance < 0 or not count:
        return slope, intercept, math.nan, math.nan
    sigma = math.sqrt(variance)
    upper = min(int(np.round((count - z * sigma) / 2.0)), count - 1)
    lower = max(int(np.round((count + z * sigma) / 2.0)) - 1, 0)
    return slope, intercept, float(slopes[lower]), float(slopes[upper])


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
    slope, intercept, lo, hi = theil_sen(yy, tt, confidence)
    return Trend(
        slope,
        lo,
        hi,
        intercept,
        len(t),
        float(t[-1] - t[0]),
        float(y[0]),
        float(y[-1]),
        confidence,
    )
