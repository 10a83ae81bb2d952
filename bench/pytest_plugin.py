"""bench/pytest_plugin: what the leakhunt pytest plugin costs a test run that does not use it.

The plugin is loaded into every pytest run of an environment where leakhunt is installed. Peer,
measured in the same run: the same suite with the plugin disabled (`-p no:leakhunt`). Also shown,
for scale: the cost of one marked test against the same test unmarked (the body runs
warmup + rounds times and RSS is read after each). Goal: unmarked suites within noise (ratio ~1.0).

    python bench/pytest_plugin.py [--tests 300] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAIN = "def test_{i}():\n    assert sum(range(100)) == 4950\n"
MARKED = (
    "import pytest\n\n@pytest.mark.limit_native_growth('1MB')\ndef test_marked():\n    bytearray(1 << 16)\n"
)
UNMARKED = "def test_unmarked():\n    bytearray(1 << 16)\n"


def run(args: list[str], cwd: Path) -> float:
    began = time.perf_counter()
    cp = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - began
    if cp.returncode != 0:
        raise SystemExit(f"pytest failed:\n{cp.stdout[-2000:]}{cp.stderr[-2000:]}")
    return elapsed


def best_of(repeat: int, args: list[str], cwd: Path) -> float:
    # Alternating runs would be fairer still, but the minimum already discounts a noisy neighbour.
    return min(run(args, cwd) for _ in range(repeat))


def import_costs() -> tuple[float, float]:
    """(plugin module alone, pytest) cumulative import times in ms, from -X importtime: the
    part of the plugin's cost that scheduling noise cannot hide."""
    cp = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import leakhunt.pytest_plugin"],
        capture_output=True,
        text=True,
        check=True,
    )
    cumulative = {}
    for line in cp.stderr.splitlines():
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[1].isdigit():
            cumulative[parts[2]] = int(parts[1]) / 1000
    return cumulative["leakhunt.pytest_plugin"] - cumulative["pytest"], cumulative["pytest"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "test_plain.py").write_text("".join(PLAIN.format(i=i) for i in range(opts.tests)))
        (d / "test_marked.py").write_text(MARKED)
        (d / "test_unmarked.py").write_text(UNMARKED)
        with_plugin, without = [], []
        for _ in range(opts.repeat):
            with_plugin.append(run(["test_plain.py"], d))
            without.append(run(["-p", "no:leakhunt", "test_plain.py"], d))
        marked = best_of(opts.repeat, ["test_marked.py"], d)
        unmarked = best_of(opts.repeat, ["test_unmarked.py"], d)
    plugin_ms, pytest_ms = min(import_costs() for _ in range(opts.repeat))
    w, wo = min(with_plugin), min(without)
    print(
        f"import: leakhunt.pytest_plugin {plugin_ms:.1f} ms on top of pytest's own {pytest_ms:.1f} ms, "
        f"ratio {plugin_ms / pytest_ms:.3f}"
    )
    print(
        f"{opts.tests} unmarked tests, best of {opts.repeat}: with plugin {w:.3f}s, without {wo:.3f}s, "
        f"ratio {w / wo:.3f} (median ratio {statistics.median(with_plugin) / statistics.median(without):.3f})"
    )
    print(
        f"one marked test (2 warm-up + 10 measured rounds): {marked:.3f}s vs unmarked {unmarked:.3f}s, "
        f"ratio {marked / unmarked:.3f} (whole pytest process)"
    )


if __name__ == "__main__":
    main()
