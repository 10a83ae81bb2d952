"""bench/smaps: the cost of one full leakhunt sample against its peers, on the same process.

Peers, measured in the same run on a process with 10k and 50k mappings (fixtures/leakers/manymaps):
  cat      `cat /proc/PID/smaps > /dev/null`: the kernel's own cost of producing the text, the floor
  pmap -X  procps's extended map report, what people run by hand
  psutil   psutil.Process(pid).memory_maps(grouped=False)
leakhunt's sample is Sampler.take(): read smaps, parse every field of every mapping, classify, group,
plus /proc/PID/status. Goal: at most half of pmap -X, within 2x of cat. End to end, `leakhunt maps
--pid` as a process (interpreter, imports, tables) against `pmap -X`: goal at most 0.4x at 50k.

    python bench/smaps.py [--repeat 7] [--sizes 10000,50000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leakhunt.proc.sampler import Sampler  # noqa: E402
from leakhunt.proc.smaps import parse_smaps  # noqa: E402
from leakhunt.proc.target import open_target, proc_read  # noqa: E402


def timed(fn, repeat: int) -> float:
    fn()  # warm caches (page tables, Python allocator) so every contender is measured warm
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def shell(argv: list[str]):
    def run():
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--sizes", default="10000,50000")
    args = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(ROOT / "fixtures/leakers")], check=True)
    print(f"{'mappings':>9} {'contender':<22} {'median':>10} {'vs leakhunt':>12}")
    verdicts = []
    for n in (int(x) for x in args.sizes.split(",")):
        proc = subprocess.Popen(
            [str(ROOT / "fixtures/leakers/build/manymaps"), str(n)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout.readline().startswith("ready")
            pid = proc.pid
            sampler = Sampler(open_target(pid))
            mappings = len(sampler.take().snapshot)
            # `cat` through a shell costs a fork+exec; measure the shell's own floor and take it off,
            # so that cat stands for the kernel's work alone and pmap is not charged for its start.
            spawn_floor = timed(shell(["true"]), args.repeat)
            results = {
                "leakhunt sample": timed(sampler.take, args.repeat),
                "leakhunt parse only": timed(
                    lambda pid=pid: parse_smaps(proc_read(pid, "smaps")), args.repeat
                ),
                "cat smaps": timed(shell(["cat", f"/proc/{pid}/smaps"]), args.repeat) - spawn_floor,
                "pmap -X": timed(shell(["pmap", "-X", str(pid)]), args.repeat) - spawn_floor,
                "psutil memory_maps": timed(
                    lambda pid=pid: psutil.Process(pid).memory_maps(grouped=False), args.repeat
                ),
                # end to end, as a person runs them: interpreter start and imports included
                "maps --pid (process)": timed(
                    shell([sys.executable, "-m", "leakhunt", "maps", "--pid", str(pid)]), args.repeat
                ),
                "pmap -X (process)": timed(shell(["pmap", "-X", str(pid)]), args.repeat),
            }
        finally:
            proc.terminate()
            proc.wait()
        ours = results["leakhunt sample"]
        for name, secs in results.items():
            print(f"{mappings:>9} {name:<22} {secs * 1000:>8.1f}ms {secs / ours:>11.2f}x")
        vs_pmap = ours / results["pmap -X"]
        vs_cat = ours / results["cat smaps"]
        print(
            f"{mappings:>9} ratios: leakhunt/pmap -X = {vs_pmap:.2f} (goal <= 0.5), "
            f"leakhunt/cat = {vs_cat:.2f} (goal <= 2.0), "
            f"psutil/leakhunt = {results['psutil memory_maps'] / ours:.2f}"
        )
        e2e = results["maps --pid (process)"] / results["pmap -X (process)"]
        print(f"{mappings:>9} end to end: leakhunt maps --pid / pmap -X = {e2e:.2f} (goal <= 0.4 at 50k)")
        verdicts.append(vs_pmap <= 0.5 and vs_cat <= 2.0 and (mappings < 40_000 or e2e <= 0.4))
        print()
    print("goals met" if all(verdicts) else "goals NOT met")


if __name__ == "__main__":
    main()
