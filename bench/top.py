"""bench/top: what `leakhunt top` costs the node, at 500 processes and a 5 s interval.

500 real processes (fixtures/leakers/steady at a low rate, each mapping and unmapping now and
then, so their VmSize moves and their maps are re-read) are watched by NodeSampler, the engine of
`leakhunt top`. Measured in the same run: the CPU time of one tick (every process's status, maps
when its address space changed, held shared objects), against procps `top -b -n 1` scanning the
same process table once (its CPU time, from the children's rusage), and the ranking a refresh of
the table adds. Goal: tick and ranking at most 2% of a core at a 5 s interval.

    python bench/top.py [--processes 500] [--ticks 12]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leakhunt.proc.node import NodeSampler  # noqa: E402
from leakhunt.top import ranked  # noqa: E402

INTERVAL_S = 5.0
GOAL = 0.02


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=500)
    ap.add_argument("--ticks", type=int, default=12)
    args = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(ROOT / "fixtures/leakers")], check=True)
    steady = str(ROOT / "fixtures/leakers/build/steady")
    crowd = [
        subprocess.Popen([steady, "--rate", "64K", "--chunk", "16K"], stdout=subprocess.DEVNULL)
        for _ in range(args.processes)
    ]
    try:
        time.sleep(2)
        sampler = NodeSampler()
        sampler.tick(0.0)  # the first look lists every process's maps and command: not the steady state
        ticks = []
        for i in range(args.ticks):
            time.sleep(0.5)  # the crowd moves between ticks, as it would in 5 s
            t = time.process_time()
            sampler.tick(float(i + 1))
            ticks.append(time.process_time() - t)
        t = time.process_time()
        ranked(sampler)  # what each refresh of the table (and the final --json) adds
        rank = time.process_time() - t
        ours = statistics.median(ticks)
        peers = []
        for _ in range(5):
            before = children_cpu()
            subprocess.run(["top", "-b", "-n", "1"], stdout=subprocess.DEVNULL, check=True)
            peers.append(children_cpu() - before)
        peer = statistics.median(peers)
        share = (ours + rank) / INTERVAL_S
        print(f"processes watched              {len(sampler.tracks):>8}")
        print(f"leakhunt top, one tick (CPU)   {ours * 1e3:>8.1f} ms")
        print(f"ranking them (CPU)             {rank * 1e3:>8.1f} ms")
        print(f"procps top -b -n 1 (CPU)       {peer * 1e3:>8.1f} ms")
        print(f"leakhunt / procps top: {ours / peer:.2f}x")
        print(
            f"at a {INTERVAL_S:.0f}s interval: {share * 100:.2f}% of a core "
            f"(goal <= {GOAL * 100:.0f}%) {'OK' if share <= GOAL else 'MISSED'}"
        )
    finally:
        for p in crowd:
            p.kill()
        for p in crowd:
            p.wait()


if __name__ == "__main__":
    main()
