"""The pytest plugin, run by pytester in a fresh pytest process: mmap leaks a heap profiler cannot
see fail the marked test, balanced mappings pass, and unmarked runs are left alone."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SUBJECTS = """
import ctypes, mmap, pytest

KEEP = []
CALLS = []
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long
MIB = 1 << 20

def leak_with_mmap_module():
    m = mmap.mmap(-1, 2 * MIB)
    m.write(b"x" * (2 * MIB))          # touch every page: it is resident now
    KEEP.append(m)

def leak_with_raw_syscall():
    # syscall(SYS_mmap): what UCX's hooks do, and what no malloc-level profiler intercepts.
    addr = LIBC.syscall(9, 0, 2 * MIB, 3, 0x22, -1, 0)
    assert addr > 0
    ctypes.memset(addr, 1, 2 * MIB)

def balanced():
    m = mmap.mmap(-1, 2 * MIB)
    m.write(b"x" * (2 * MIB))
    m.close()

@pytest.mark.limit_native_growth("1MB")
def test_mmap_module_leak():
    leak_with_mmap_module()

@pytest.mark.limit_native_growth("1MB", rounds=5)
def test_raw_syscall_leak():
    leak_with_raw_syscall()

@pytest.mark.limit_native_growth("1MB")
def test_balanced_mappings():
    balanced()

@pytest.mark.limit_native_growth(limit=4 * MIB, rounds=5, warmup=1)
def test_leak_below_limit():
    leak_with_mmap_module()

@pytest.mark.limit_native_growth("1MB", rounds=4, warmup=3)
def test_body_runs_warmup_plus_rounds(tmp_path):
    CALLS.append(1)

def test_calls_counted():
    assert len(CALLS) == 7

def test_fixture_catches_leak(native_leak_check):
    native_leak_check(leak_with_raw_syscall, limit="512KiB", rounds=5)

def test_fixture_passes_balanced(native_leak_check):
    growth = native_leak_check(balanced, limit="512KiB")
    assert growth.rounds == 10 and not growth.exceeded

@pytest.mark.limit_native_growth()
def test_marker_without_limit():
    pass
"""


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    """One inner pytest run over every subject (a subprocess costs a second)."""
    pytester_dir = tmp_path_factory.mktemp("plugin")
    (pytester_dir / "test_subjects.py").write_text(SUBJECTS)
    import subprocess
    import sys

    cp = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            "-p",
            "no:cacheprovider",
            "-rf",
            str(pytester_dir / "test_subjects.py"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=pytester_dir,
    )
    return cp


def _status(cp, name: str) -> str:
    for line in cp.stdout.splitlines():
        if f"::{name} " in line and "test_subjects.py" in line:
            return line.split()[1]
    raise AssertionError(f"{name} not in the output:\n{cp.stdout}")


@pytest.mark.parametrize(
    "name, status",
    [
        ("test_mmap_module_leak", "FAILED"),
        ("test_raw_syscall_leak", "FAILED"),
        ("test_balanced_mappings", "PASSED"),
        ("test_leak_below_limit", "PASSED"),
        ("test_body_runs_warmup_plus_rounds", "PASSED"),
        ("test_calls_counted", "PASSED"),
        ("test_fixture_catches_leak", "FAILED"),
        ("test_fixture_passes_balanced", "PASSED"),
        ("test_marker_without_limit", "FAILED"),
    ],
)
def test_outcomes(outcome, name, status):
    assert _status(outcome, name) == status, outcome.stdout[-3000:]


def test_failure_says_how_fast_and_which_class(outcome):
    section = outcome.stdout.split(" test_raw_syscall_leak ", 1)[1].split("\n_", 1)[0]
    assert "native RSS grew +2.0 MiB per round" in section and "anon +" in section, section


def test_unmarked_runs_import_nothing_heavy(pytester):
    pytester.makepyfile("""
        import sys
        def test_plain():
            heavy = [m for m in ("leakhunt.proc", "leakhunt.analysis", "numpy", "scipy") if m in sys.modules]
            assert not heavy, heavy
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
