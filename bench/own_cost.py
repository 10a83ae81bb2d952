"""bench/own_cost: what leakhunt costs to leave running, on a process with 50k mappings at 1 Hz.

Contenders, in the same run, on the same target (fixtures/leakers/manymaps, steady):
  watch             `leakhunt watch --pid P --interval 1s` (adaptive: a full smaps read every 10
                    samples, backing off to every 80 while nothing changes)
  watch full        the same with --full-every 1 (every sample a full read, as before)
  pmap -X loop      `pmap -X P` once a second, what people run by hand
Each is measured as a process: CPU seconds (its own and its children's) over the wall time, and
its peak RSS (polled). Goals (issue 17): at most 3% of a core and at most 150 MB for watch.

    python bench/own_cost.py [--seconds 60] [--mappings 50000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
GOAL_CPU = 0.03
GOAL_RSS = 150 * 2**20


def measure(argv: list[str], seconds: float) -> tuple[float, int]:
    """(share of a core, peak RSS in bytes) of ``argv`` and its children over ``seconds``."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p = psutil.Process(proc.pid)
    began = time.monotonic()
    peak = 0
    cpu = 0.0
    while time.monotonic() - began < seconds and proc.poll() is None:
        try:
            peak = max(peak, p.memory_info().rss)
            t = p.cpu_times()
            cpu = t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            break
        time.sleep(0.25)
    proc.terminate()
    proc.wait(30)
    return cpu / (time.monotonic() - began), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--mappings", type=int, default=50_000)
    args = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(ROOT / "fixtures/leakers")], check=True)
    target = subprocess.Popen(
        [str(ROOT / "fixtures/leakers/build/manymaps"), str(args.mappings)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert target.stdout.readline().startswith("ready")
        pid = str(target.pid)
        watch = [sys.executable, "-m", "leakhunt", "watch", "--pid", pid, "--interval", "1s", "--json"]
        contenders = {
            "watch": watch,
            "watch --full-every 1": [*watch, "--full-every", "1"],
            "pmap -X loop": ["sh", "-c", f"while :; do pmap -X {pid} > /dev/null; sleep 1; done"],
        }
        results = {name: measure(argv, args.seconds) for name, argv in contenders.items()}
    finally:
        target.terminate()
        target.wait()
    print(f"{args.mappings} mappings, 1 Hz, {args.seconds:.0f} s each")
    print(f"{'contender':<22} {'core':>7} {'peak RSS':>10} {'core vs pmap loop':>18}")
    peer = results["pmap -X loop"][0]
    for name, (core, rss) in results.items():
        print(f"{name:<22} {core:>6.1%} {rss / 2**20:>8.0f}MB {core / peer:>17.2f}x")
    core, rss = results["watch"]
    met = core <= GOAL_CPU and rss <= GOAL_RSS
    print(
        f"watch: {core:.1%} of a core (goal <= {GOAL_CPU:.0%}), {rss / 2**20:.0f} MB "
        f"(goal <= {GOAL_RSS // 2**20} MB): {'goals met' if met else 'goals NOT met'}"
    )


if __name__ == "__main__":
    main()
