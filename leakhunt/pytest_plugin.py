"""pytest plugin (entry point ``leakhunt``): fail a test whose repeated body grows native RSS.

pytest-memray's ``limit_memory``/``limit_leaks`` count what the allocator hands out; memory mapped
by raw ``mmap`` syscalls, ``/dev/shm`` or a driver never passes through it. This plugin measures
the process's RSS itself (every mapping, from /proc/self/smaps_rollup), so it sees those too::

    @pytest.mark.limit_native_growth("1MB", rounds=10, warmup=2)
    def test_encode(): ...

    def test_pool(native_leak_check):
        native_leak_check(lambda: pool.run(batch), limit="256KiB")

The body runs ``warmup`` times unmeasured (caches, lazy imports), then ``rounds`` times with RSS
read after each; the test fails when the lower bound of the Theil–Sen slope per round exceeds the
limit. The plugin is loaded into every pytest run where leakhunt is installed, so it imports
nothing heavy and does nothing at all for tests that do not ask for it.
"""

from __future__ import annotations

import gc
import inspect
import os
from dataclasses import dataclass

import pytest

MARKER = "limit_native_growth"
DEFAULT_ROUNDS = 10
DEFAULT_WARMUP = 2


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(limit, rounds={DEFAULT_ROUNDS}, warmup={DEFAULT_WARMUP}): run the test body repeatedly and "
        "fail when native RSS (mmap growth included) grows faster than LIMIT (e.g. '1MB') per round (leakhunt)",
    )


@dataclass(frozen=True)
class NativeGrowth:
    """What a repeated body did to the process's RSS."""

    per_round: float  # Theil–Sen slope, bytes per round
    lower: float  # its 95% interval
    upper: float
    rounds: int
    rss: tuple[int, ...]  # after the warm-up, then after each round
    by_class: dict[str, int]  # growth over the measured rounds by region class
    limit: int

    @property
    def exceeded(self) -> bool:
        return self.lower > self.limit

    def describe(self) -> str:
        from leakhunt.units import format_bytes

        classes = ", ".join(
            f"{k} {format_bytes(v, signed=True)}"
            for k, v in sorted(self.by_class.items(), key=lambda kv: -kv[1])
            if v
        )
        return (
            f"native RSS grew {format_bytes(self.per_round, signed=True)} per round (95% interval "
            f"{format_bytes(self.lower, signed=True)} .. {format_bytes(self.upper, signed=True)}) over "
            f"{self.rounds} rounds, limit {format_bytes(self.limit)} per round; by class: {classes or 'none'}"
        )


def _own_rss() -> int:
    with open(f"/proc/{os.getpid()}/smaps_rollup", "rb") as f:
        for line in f:
            if line.startswith(b"Rss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Rss line in smaps_rollup")


def _class_totals() -> dict[str, int]:
    from leakhunt.proc.smaps import read_smaps

    return {k.value: v for k, v in read_smaps(os.getpid()).class_totals().items()}


def _limit_bytes(limit) -> int:
    if isinstance(limit, (int, float)):
        return int(limit)
    from leakhunt.units import parse_size

    return parse_size(str(limit))


def measure_native_growth(
    body, limit, rounds: int = DEFAULT_ROUNDS, warmup: int = DEFAULT_WARMUP
) -> NativeGrowth:
    """Call ``body()`` warmup + rounds times and fit the RSS it leaves behind per round."""
    from leakhunt.analysis.slope import fit

    if rounds < 3:
        raise ValueError(f"{MARKER} needs at least 3 rounds to fit a slope (got {rounds})")
    limit_b = _limit_bytes(limit)
    for _ in range(warmup):
        body()
    gc.collect()
    classes_before = _class_totals()
    rss = [_own_rss()]
    for _ in range(rounds):
        body()
        gc.collect()  # garbage not yet collected is not a leak
        rss.append(_own_rss())
    classes_after = _class_totals()
    trend = fit(list(range(len(rss))), rss)
    by_class = {
        k: classes_after.get(k, 0) - classes_before.get(k, 0) for k in classes_before.keys() | classes_after
    }
    return NativeGrowth(trend.slope, trend.lo, trend.hi, rounds, tuple(rss), by_class, limit_b)


def _check(body, limit, rounds: int, warmup: int) -> NativeGrowth:
    growth = measure_native_growth(body, limit, rounds, warmup)
    if growth.exceeded:
        pytest.fail(growth.describe(), pytrace=False)
    return growth


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    marker = pyfuncitem.get_closest_marker(MARKER)
    if marker is None:
        return None
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        pytest.fail(f"@pytest.mark.{MARKER} does not support async tests", pytrace=False)
    args = marker.args
    limit = marker.kwargs.get("limit", args[0] if args else None)
    if limit is None:
        pytest.fail(f"@pytest.mark.{MARKER} needs a limit, e.g. @pytest.mark.{MARKER}('1MB')", pytrace=False)
    funcargs = pyfuncitem.funcargs
    testargs = {name: funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    _check(
        lambda: pyfuncitem.obj(**testargs),
        limit,
        int(marker.kwargs.get("rounds", DEFAULT_ROUNDS)),
        int(marker.kwargs.get("warmup", DEFAULT_WARMUP)),
    )
    return True


@pytest.fixture
def native_leak_check():
    """``native_leak_check(body, limit="1MB", rounds=10, warmup=2)``: call body repeatedly and fail
    the test when RSS grows more than ``limit`` per call; returns the measurement."""

    def check(body, limit="1MB", rounds: int = DEFAULT_ROUNDS, warmup: int = DEFAULT_WARMUP) -> NativeGrowth:
        return _check(body, limit, rounds, warmup)

    return check
