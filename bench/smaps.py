"""bench/smaps: the cost of one full leakhunt sample against its peers, on the same process.

Peers, measured in the same run on a process with 10k and 50k mappings (fixtures/leakers/manymaps):
  cat      `cat /proc/PID/smaps > /dev/null`: the kernel's own cost of producing the text, the floor
  pmap -X  procps's extended map report, what people run by hand
  psutil   psutil.Process(pid).memory_maps(grouped=False)
leakhunt's sample is Sampler.take(): read smaps, parse every field of every mapping, classify, group,
plus /proc/PID/status. Goal: at most half of pmap -X, within 2x of cat. End to end, `leakhunt maps
--pid` as a process (interpreter, imports, tables) against `pmap -X`: goal at most 0.4x at 50k.

--torch adds a real PyTorch process (torch imported, a model run, a DataLoader's workers alive):
a few thousand mappings of hundreds of distinct libraries rather than manymaps' anonymous ones,
so grouping by path does real work. It is reported, not judged: at that size the interpreter's
start is most of `maps --pid`.

    python bench/smaps.py [--repeat 7] [--sizes 10000,50000] [--torch]
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


#: A PyTorch process as servers run one: a model's forward passes, and a DataLoader whose worker
#: processes stay alive (persistent_workers), each with its shared-memory batches.
TORCH_SUBJECT = """
import sys, torch
from torch.utils.data import DataLoader, TensorDataset
model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 512))
data = DataLoader(TensorDataset(torch.randn(4096, 512)), batch_size=256, num_workers=2,
                  persistent_workers=True)
with torch.no_grad():
    for (x,) in data:
        model(x)
print("ready", flush=True)
sys.stdin.read()
"""


def measure(pid: int, repeat: int) -> tuple[int, dict[str, float]]:
    """The process's mapping count, and each contender's median seconds on it."""
    sampler = Sampler(open_target(pid))
    mappings = len(sampler.take().snapshot)
    # `cat` through a shell costs a fork+exec; measure the shell's own floor and take it off,
    # so that cat stands for the kernel's work alone and pmap is not charged for its start.
    spawn_floor = timed(shell(["true"]), repeat)
    return mappings, {
        "leakhunt sample": timed(sampler.take, repeat),
        "leakhunt parse only": timed(lambda: parse_smaps(proc_read(pid, "smaps")), repeat),
        "cat smaps": timed(shell(["cat", f"/proc/{pid}/smaps"]), repeat) - spawn_floor,
        "pmap -X": timed(shell(["pmap", "-X", str(pid)]), repeat) - spawn_floor,
        "psutil memory_maps": timed(lambda: psutil.Process(pid).memory_maps(grouped=False), repeat),
        # end to end, as a person runs them: interpreter start and imports included
        "maps --pid (process)": timed(
            shell([sys.executable, "-m", "leakhunt", "maps", "--pid", str(pid)]), repeat
        ),
        "pmap -X (process)": timed(shell(["pmap", "-X", str(pid)]), repeat),
    }


def subjects(sizes: list[int], torch: bool):
    """(name, argv) of each process to measure: manymaps at each size, then the torch process."""
    for n in sizes:
        yield f"manymaps {n}", [str(ROOT / "fixtures/leakers/build/manymaps"), str(n)]
    if torch:
        yield "torch", [sys.executable, "-c", TORCH_SUBJECT]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--sizes", default="10000,50000")
    ap.add_argument("--torch", action="store_true", help="also a real PyTorch process (reported, not judged)")
    args = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(ROOT / "fixtures/leakers")], check=True)
    print(f"{'mappings':>9} {'contender':<22} {'median':>10} {'vs leakhunt':>12}")
    verdicts = []
    sizes = [int(x) for x in args.sizes.split(",") if x]
    for name, argv in subjects(sizes, args.torch):
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().startswith("ready"), f"{name} did not start"
            mappings, results = measure(proc.pid, args.repeat)
        finally:
            proc.terminate()
            proc.wait()
        print(f"{name}:")
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
        goal = "reported: the interpreter's start is most of it" if name == "torch" else "goal <= 0.4 at 50k"
        print(f"{mappings:>9} end to end: leakhunt maps --pid / pmap -X = {e2e:.2f} ({goal})")
        if name != "torch":
            verdicts.append(vs_pmap <= 0.5 and vs_cat <= 2.0 and (mappings < 40_000 or e2e <= 0.4))
        print()
    print("goals met" if all(verdicts) else "goals NOT met")


if __name__ == "__main__":
    main()
