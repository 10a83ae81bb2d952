"""bench/footprint: what measuring held shared memory adds to a sample, at 10,000 shared objects.

A process maps 10,000 memfd objects (fixtures/leakers/manymaps N --shm). The same sample is taken
with and without the shared-object accounting (ShmAccountant.measure: one stat per object through
/proc/PID/map_files, new and changed objects at once, the others one in REFRESH_EVERY; the memory
cgroup's files and a statfs of /dev/shm), in the
same run, interleaved so that both see the same machine. Reported: the median of a plain sample
(read and parse smaps, classify, group, status), of the accounting alone, and their ratio.
Goal: a sample with the footprint costs at most 1.2x a plain smaps sample.

    python bench/footprint.py [--objects 10000] [--repeat 21]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leakhunt.proc.cgroup import CgroupReader, dev_shm_usage  # noqa: E402
from leakhunt.proc.growth import groups  # noqa: E402
from leakhunt.proc.shmem import ShmAccountant  # noqa: E402
from leakhunt.proc.smaps import parse_smaps  # noqa: E402
from leakhunt.proc.target import proc_read, read_status  # noqa: E402

GOAL = 1.2


def plain(pid: int):
    snap = parse_smaps(proc_read(pid, "smaps"))
    snap.class_totals()
    groups(snap)
    read_status(pid)
    return snap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=21)
    args = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(ROOT / "fixtures/leakers")], check=True)
    proc = subprocess.Popen(
        [str(ROOT / "fixtures/leakers/build/manymaps"), str(args.objects), "--shm"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("ready")
        acc = ShmAccountant(proc.pid)
        cgroup = CgroupReader(proc.pid)
        acc.measure(plain(proc.pid))  # the first look stats every object; steady state is what repeats
        base, extra, stale = [], [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            snap = plain(proc.pid)
            base.append(time.perf_counter() - t)
            t = time.perf_counter()
            held = acc.measure(snap)
            cgroup.read()
            dev_shm_usage(proc.pid)
            extra.append(time.perf_counter() - t)
            stale.append(held.stale)
        b, e = statistics.median(base), statistics.median(extra)
        first = time.perf_counter()
        ShmAccountant(proc.pid).measure(snap)
        first = time.perf_counter() - first
        ratio = (b + e) / b
        print(
            f"shared objects           {len(held):>8}   ({held.deleted_objects} deleted, {held.bytes >> 20} MiB held)"
        )
        print(f"plain smaps sample       {b * 1e3:>8.1f} ms")
        print(
            f"footprint accounting     {e * 1e3:>8.1f} ms   (re-measured {len(held) - int(statistics.median(stale))} objects a sample)"
        )
        print(f"first look (every stat)  {first * 1e3:>8.1f} ms")
        print(
            f"sample with footprint / plain sample: {ratio:.2f}x (goal <= {GOAL}x) {'OK' if ratio <= GOAL else 'MISSED'}"
        )
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
