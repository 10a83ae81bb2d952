"""Leak verdicts: significant, still growing, and not fooled by plateaus or noise."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leakhunt.analysis.slope import fit, theil_sen
from leakhunt.analysis.verdict import judge

MiB = 2**20
T = np.arange(0, 21, 1.0)


def test_slope_is_exact_on_a_line():
    trend = fit(T, 100 * MiB + 4 * MiB * T)
    assert trend.slope == pytest.approx(4 * MiB)
    assert trend.lo <= trend.slope <= trend.hi


def test_theil_sen_ignores_spikes():
    y = 100 * MiB + 2 * MiB * T
    y[[3, 9, 15]] += 300 * MiB  # transient buffers
    assert fit(T, y).slope == pytest.approx(2 * MiB, rel=0.02)


def test_steady_growth_is_a_leak():
    rng = np.random.default_rng(1)
    v = judge(T, 100 * MiB + 4 * MiB * T + rng.normal(0, MiB, len(T)))
    assert v.leak and not v.plateau
    assert v.trend.slope == pytest.approx(4 * MiB, rel=0.1)
    assert "growing" in v.reason


def test_plateau_is_not_a_leak():
    rng = np.random.default_rng(2)
    y = 100 * MiB + np.minimum(T, 5) * 8 * MiB + rng.normal(0, 0.2 * MiB, len(T))
    v = judge(T, y)
    assert not v.leak and v.plateau
    assert "levelled off" in v.reason


def test_flat_noise_is_not_a_leak():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        assert not judge(T, 100 * MiB + rng.normal(0, MiB, len(T))).leak


def test_warmup_growth_is_discarded():
    y = np.where(T < 6, 100 * MiB + 20 * MiB * T, 220 * MiB)
    v = judge(T, y, warmup_s=6)
    assert not v.leak and v.trend.slope == 0


def test_too_few_samples_is_said():
    v = judge(T[:4], 4 * MiB * T[:4])
    assert not v.leak and "not enough data" in v.reason


def test_long_series_are_thinned_but_keep_the_slope():
    t = np.arange(0, 20000, 1.0)
    assert fit(t, 3 * t + 5).slope == pytest.approx(3, rel=1e-3)


def test_a_few_seconds_of_creep_is_too_little_to_call():
    """Seen on the reference server: +0.23 MiB/min for 7 s, a clean line; 27 KiB is no leak yet."""
    t = np.arange(0, 8, 1.0)
    v = judge(t, 300 * MiB + 4096 * np.floor(t * 0.95), warmup_s=0)
    assert not v.leak and "too little to call" in v.reason


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=3, max_size=60),
    st.lists(st.integers(-5, 5), min_size=60, max_size=60),
    st.sampled_from([0.95, 0.9, 0.99, 0.05]),
)
def test_theil_sen_matches_scipy_ties_and_all(xs, ys, confidence):
    """The numpy Theil-Sen (leakhunt does not import scipy: 68 MB of RSS) gives scipy's answers,
    interval included, on series with repeated times and repeated values."""
    from scipy.stats import theilslopes

    x = np.array(xs, np.float64)
    y = np.array(ys[: len(xs)], np.float64) * MiB + 3 * MiB * x
    if np.ptp(x) == 0:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # its sqrt of a negative variance: NaN bounds
        ref = theilslopes(y, x, alpha=confidence)
    ours = theil_sen(y, x, confidence)
    np.testing.assert_allclose(
        ours, (ref.slope, ref.intercept, ref.low_slope, ref.high_slope), equal_nan=True
    )


def test_sampling_commands_do_not_import_scipy_pandas_or_matplotlib():
    """What a watch or an exporter left running for hours carries in its RSS: no heavy imports."""
    code = (
        "import sys, leakhunt.commands.watch, leakhunt.commands.export, leakhunt.commands.top, "
        "leakhunt.analysis.slope\n"
        "print(','.join(m for m in ('scipy', 'pandas', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
