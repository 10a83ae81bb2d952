"""bench/gdb: what the gdb backend costs its target, per breakpoint hit and as a slowdown.

One C program (built here) runs a closed loop: units of CPU work, then an mmap+munmap of 64 KiB
through syscall(SYS_mmap) and munmap(): two breakpoint hits, each with a full stack and a returned
address. The work between calls is calibrated so that, untouched, the program makes 10, 100 or
1000 hits/s. Each is measured untouched, then traced by leakhunt's gdb backend, then untouched
again: the same process is its own peer, in the same run. A last row makes 1000 calls/s of
syscall(SYS_getpid), which the breakpoint conditions reject: the price of a trap that stops
nothing. Printed per rate:

  slowdown       work per second untouched / traced (1.00 = no effect; noise = before vs after)
  hits/s         what the traced program still made
  cost/hit       extra wall time of a traced call, timed inside the target, per hit
  stopped        cost/hit x hits/s: the share of the calling thread's time spent stopped
  leakhunt view  the stops as leakhunt times them (*stopped to ^running), for comparison

and the longest pause of the target's loop while gdb attaches, against its longest untouched.
The target runs on CPU 1, leakhunt and gdb on CPU 0 (a server has a spare core for its debugger).

    python bench/gdb.py [--window 3] [--rates 10,100,1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leakhunt.gdb.backend import GdbBackend, gdb_extra  # noqa: E402
from leakhunt.proc.target import open_target  # noqa: E402
from leakhunt.trace.backend import TraceOptions  # noqa: E402
from leakhunt.trace.events import EventKind  # noqa: E402

TARGET = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static volatile unsigned long sink;
static void work(void) { for (unsigned long i = 0; i < 2000; i++) sink += i * i; }

/* A closed loop: work, then a call, forever. argv[1]: the hits per second it makes untouched
 * (the work between calls is calibrated for it); argv[2]: 1 = an mmap+munmap pair through
 * syscall(SYS_mmap) and munmap() (2 hits), 0 = syscall(SYS_getpid), which no condition accepts. */
int main(int argc, char **argv) {
    double rate = atof(argv[1]);
    int matching = atoi(argv[2]);
    double c0 = now();
    unsigned long n = 0;
    while (now() - c0 < 0.3) { work(); n++; }
    unsigned long per_cycle = (unsigned long)((matching ? 2.0 : 1.0) / rate / (0.3 / n));
    if (per_cycle < 1) per_cycle = 1;
    printf("ready %d\n", getpid());
    fflush(stdout);
    double next_print = now() + 0.1, last = now(), gap = 0, in_calls = 0;
    unsigned long units = 0, calls = 0;
    for (;;) {
        for (unsigned long i = 0; i < per_cycle; i++) {
            work();
            units++;
            double t = now();
            if (t - last > gap) gap = t - last;
            last = t;
        }
        double t = now();
        if (matching) {
            void *p = (void *)syscall(SYS_mmap, NULL, 65536, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            munmap(p, 65536);
            calls += 2;
        } else {
            syscall(SYS_getpid);
            calls += 1;
        }
        last = now();
        in_calls += last - t;        /* the calls' own wall time, stops included */
        if (last >= next_print) {
            printf("%.6f %lu %lu %.0f %.9f\n", last, units, calls, gap * 1e6, in_calls);
            fflush(stdout);
            gap = 0;
            next_print += 0.1;
        }
    }
}
"""


#: The target runs alone on one CPU, leakhunt and gdb on another: a server has spare cores for its
#: debugger, and the measure is then the target's stops, not a fight for one core.
TARGET_CPU, TRACER_CPU = 1, 0


class Sample(NamedTuple):
    t: float  # CLOCK_MONOTONIC, the clock of time.monotonic()
    units: int  # work units done so far
    calls: int  # traced calls made so far (hits when they match a breakpoint)
    gap_us: float  # longest pause of the loop in the last 100 ms
    in_calls_s: float  # wall time spent inside those calls so far, stops included


@dataclass
class Window:
    work_per_s: float
    calls_per_s: float
    call_ms: float  # mean wall time per counted call (a pair counts 2), stops included
    max_gap_ms: float


class Target:
    """The C program, its counters read from stdout as it prints them."""

    def __init__(self, binary: Path, rate: float, matching: bool) -> None:
        self.proc = subprocess.Popen(
            [str(binary), str(rate), "1" if matching else "0"],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.sched_setaffinity(0, {TARGET_CPU}),
        )
        assert self.proc.stdout.readline().startswith("ready")
        self.samples: list[Sample] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            t, units, calls, gap, in_calls = line.split()
            self.samples.append(Sample(float(t), int(units), int(calls), float(gap), float(in_calls)))

    def measure(self, seconds: float) -> Window:
        start = time.monotonic()
        time.sleep(seconds)
        return self.between(start, time.monotonic())

    def between(self, t0: float, t1: float) -> Window:
        inside = [s for s in self.samples if t0 <= s.t <= t1]
        if len(inside) < 3:
            raise RuntimeError(f"the target printed {len(inside)} samples in {t1 - t0:.1f}s: is it stopped?")
        a, b = inside[0], inside[-1]
        calls = b.calls - a.calls
        return Window(
            (b.units - a.units) / (b.t - a.t),
            calls / (b.t - a.t),
            (b.in_calls_s - a.in_calls_s) / calls * 1000 if calls else 0.0,
            max(s.gap_us for s in inside) / 1000,
        )

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def run_rate(binary: Path, rate: float, matching: bool, window: float) -> dict:
    """Untouched, traced, untouched again: the same process is its own peer."""
    target = Target(binary, rate, matching)
    try:
        before = target.measure(window)
        backend = GdbBackend(
            open_target(target.proc.pid),
            TraceOptions(
                kinds=frozenset({EventKind.MMAP, EventKind.MUNMAP}),
                extra=gdb_extra(max_hits=10**7, python_frames=False),
            ),
        )
        attach_started = time.monotonic()
        backend.start()
        time.sleep(0.3)  # the target's next prints
        attach = target.between(attach_started, time.monotonic())
        done = threading.Event()
        consumer = threading.Thread(
            target=lambda: [backend.poll(0.2) for _ in iter(done.is_set, True)], daemon=True
        )
        consumer.start()
        traced = target.measure(window)
        cost = backend._session.cost
        hits, stopped = cost.hits, cost.stopped_s
        backend.stop()
        for note in backend.stats.notes:
            print(f"  {rate:.0f}/s: {note}", file=sys.stderr)
        done.set()
        consumer.join()
        after = target.measure(window)
    finally:
        target.stop()
    untouched_work = (before.work_per_s + after.work_per_s) / 2
    untouched_call = (before.call_ms + after.call_ms) / 2
    per_hit = traced.call_ms - untouched_call  # the target counts each hit (or rejected trap) as a call
    return {
        "rate": rate,
        "matching": matching,
        "hits_per_s": traced.calls_per_s,
        "slowdown": untouched_work / traced.work_per_s,
        "noise": abs(before.work_per_s - after.work_per_s) / untouched_work,
        "cost_per_hit_ms": per_hit,
        "stopped_fraction": min(1.0, per_hit / 1000 * traced.calls_per_s),
        "stopped_per_hit_ms": stopped / hits * 1000 if hits else float("nan"),
        "attach_pause_ms": attach.max_gap_ms,
        "untouched_pause_ms": max(before.max_gap_ms, after.max_gap_ms),
        "traced_pause_ms": traced.max_gap_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=float, default=3.0, help="seconds per phase (default 3)")
    ap.add_argument("--rates", default="10,100,1000")
    args = ap.parse_args()
    if shutil.which("gdb") is None or shutil.which("cc") is None or (os.cpu_count() or 1) < 2:
        print("bench/gdb skipped: needs gdb, cc and two CPUs")
        return
    os.sched_setaffinity(0, {TRACER_CPU})  # gdb inherits it
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "target.c"
        source.write_text(TARGET)
        binary = Path(tmp) / "target"
        subprocess.run(["cc", "-O1", "-o", str(binary), str(source)], check=True)
        rows = [run_rate(binary, float(r), True, args.window) for r in args.rates.split(",")]
        rows.append(run_rate(binary, 1000.0, False, args.window))
    print(
        f"{'offered':>15} {'slowdown':>9} {'(noise)':>8} {'hits/s':>7} {'cost/hit':>9} {'stopped':>8} "
        f"{'leakhunt view':>14} {'attach pause':>13} {'untouched':>10}"
    )
    for r in rows:
        what = f"{r['rate']:.0f} hits/s" if r["matching"] else f"{r['rate']:.0f} rejected/s"
        hits = f"{r['hits_per_s']:.0f}" if r["matching"] else "0"
        view = f"{r['stopped_per_hit_ms']:.2f} ms" if r["matching"] else "-"
        print(
            f"{what:>15} {r['slowdown']:>8.2f}x {r['noise']:>7.0%} {hits:>7} {r['cost_per_hit_ms']:>6.2f} ms "
            f"{r['stopped_fraction']:>8.1%} {view:>14} {r['attach_pause_ms']:>10.0f} ms "
            f"{r['untouched_pause_ms']:>7.0f} ms"
        )
    print("(columns: see the docstring of bench/gdb.py)")
    hits = [r for r in rows if r["matching"]]
    print(
        "slowdown ratios (untouched/traced): "
        + ", ".join(f"{r['rate']:.0f} hits/s {r['slowdown']:.2f}x" for r in hits)
        + f"; {rows[-1]['rate']:.0f} rejected traps/s {rows[-1]['slowdown']:.2f}x"
    )


if __name__ == "__main__":
    main()
