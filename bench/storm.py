"""bench/storm: the incident's event storm, leakhunt against its peers, one run.

The target is fixtures/leakers/hook_storm: libucm's shape (every munmap of the process goes
through a hook whose pool grows; most munmaps are of ranges that are not mapped at all), paced
at R memory syscalls a second: 0.4R munmaps of holes and 0.3R balanced mmap/munmap pairs.

  kept      for each tracer, each rate for --seconds: kept when the tracer lost nothing, ended
            within --seconds + 2 s of its attach (SIGINT for the peers, which have no duration),
            and the target still made 95% of its calls. The highest rate kept is the result.
  slowdown  the target's CPU time per call, traced over untraced (getrusage of the target, so a
            tracer that burns its own CPU elsewhere does not hide), at 30k, 100k and 250k calls/s.

Contenders: leakhunt/bcc (the default: unmaps of untracked memory decided in the kernel),
leakhunt/bcc --all-events (every call to user space: the reader's own limit), leakhunt/bpftrace,
BCC's memleak (uprobes on libc's mmap/munmap: the hook calls the raw syscall, so it sees none of
this; shown for its cost) and strace (-e trace=memory).

Goal: leakhunt keeps up at 250k calls/s, and slows the target at most 1.15x at 100k calls/s.

    sudo .venv/bin/python bench/storm.py [--seconds 6] [--rates 30000,100000,250000,400000]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
# The attach/detach machinery of bench/trace.py (a script, not a package: loaded by path).
_spec = importlib.util.spec_from_file_location("bench_trace", ROOT / "bench" / "trace.py")
bench_trace = importlib.util.module_from_spec(_spec)
sys.modules["bench_trace"] = bench_trace  # its dataclasses look their module up
_spec.loader.exec_module(bench_trace)
Contender, attach, detach = bench_trace.Contender, bench_trace.attach, bench_trace.detach

STORM = ROOT / "fixtures" / "leakers" / "build" / "hook_storm"
SLOWDOWN_RATES = (30_000, 100_000, 250_000)
GOAL_RATE, GOAL_SLOWDOWN_AT, GOAL_SLOWDOWN = 250_000, 100_000, 1.15


@dataclass
class Run:
    name: str
    rate: int
    calls: int  # what the target made
    target_cpu_s: float
    lost: int | None = None
    over_s: float = 0.0  # how long past --seconds the tracer took to end, from its attach
    events: int | None = None  # what the tracer says it saw
    note: str = ""

    @property
    def cpu_per_call_us(self) -> float:
        return 1e6 * self.target_cpu_s / max(1, self.calls)

    def kept(self, seconds: float) -> bool:
        return self.lost == 0 and self.over_s <= 2.0 and self.calls >= 0.95 * self.rate * seconds


def contenders(seconds: float) -> list[Contender]:
    peers = {c.name: c for c in bench_trace.contenders()}
    lh = [
        sys.executable,
        "-m",
        "leakhunt",
        "trace-mmap",
        "--pid",
        "{pid}",
        "--json",
        "--duration",
        f"{seconds}s",
    ]
    return [
        Contender("leakhunt/bcc", lh + ["--backend", "bcc"], "tracing pid"),
        Contender("leakhunt/bcc all-events", lh + ["--backend", "bcc", "--all-events"], "tracing pid"),
        Contender("leakhunt/bpftrace", lh + ["--backend", "bpftrace"], "tracing pid"),
        peers["memleak"],
        peers["strace"],
    ]


def storm(contender: Contender | None, rate: int, seconds: float) -> Run:
    """One storm of ``seconds`` at ``rate`` calls/s, begun once the contender is attached."""
    holes, pairs = 0.4 * rate, 0.3 * rate
    argv = [str(STORM), "--holes", str(holes), "--pairs", str(pairs), "--duration", str(seconds)]
    target = subprocess.Popen(
        [*argv, "--start-on-stdin", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    lost = events = None
    over, note = 0.0, ""
    try:
        assert target.stdout.readline().startswith("ready")
        att = attach(contender, target.pid) if contender else None
        target.stdin.write("go\n")
        target.stdin.flush()
        began = time.monotonic()
        done = target.stdout.readline()
        _, _, usage = os.wait4(target.pid, 0)  # its own CPU, to its end
        target.returncode = 0
        if att is not None and contender.name.startswith("leakhunt"):
            try:
                att.proc.wait(seconds + 60)  # it ends on its own, at --duration
            except subprocess.TimeoutExpired:
                note = "did not end"
            over = max(0.0, time.monotonic() - began - seconds)
            detach(att)
            try:
                doc = json.loads("".join(att.out))
                lost, events = doc["lost_events"], doc["events"]
                if doc.get("backlog_events"):
                    note = f"backlog {doc['backlog_events']}"
            except ValueError:
                note = f"no summary: {''.join(att.err[-2:]).strip()[:80]}"
        elif att is not None:
            detach(att)
    finally:
        if target.poll() is None:
            target.kill()
            target.wait()
    fields = dict(kv.split("=") for kv in done.split()[1:]) if done.startswith("done") else {}
    calls = int(float(fields.get("holes", 0)) + 2 * float(fields.get("pairs", 0)))
    if contender is not None and contender.name == "memleak":
        note = "sees none: the hooks call the raw syscall, its uprobes are on libc's wrappers"
    name = contender.name if contender else "untraced"
    return Run(name, rate, calls, usage.ru_utime + usage.ru_stime, lost, over, events, note)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rates", default="30000,100000,250000,400000")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/storm: needs root (BPF)")
        return 2
    if not STORM.exists():
        subprocess.run(["make", "-C", str(ROOT / "fixtures" / "leakers")], check=True, capture_output=True)
    rates = sorted(int(r) for r in args.rates.split(","))
    usable = []
    for c in contenders(args.seconds):
        if c.available:
            print(f"  {c.name}: skipped, {c.available}")
        else:
            usable.append(c)

    print(
        f"storm: hook_storm paced at R calls/s (0.4R munmaps of holes, 0.3R mmap/munmap pairs), {args.seconds:.0f}s each"
    )
    print(
        f"{'contender':<26} {'calls/s':>8} {'made':>9} {'tracer saw':>10} {'lost':>6} {'late s':>7}"
        f" {'us/call':>8} {'slowdown':>9}  kept"
    )
    base: dict[int, Run] = {}
    best: dict[str, int] = {}
    slow: dict[tuple[str, int], float] = {}
    for rate in rates:
        base[rate] = storm(None, rate, args.seconds)
        b = base[rate]
        print(
            f"{'untraced':<26} {rate:>8} {b.calls:>9} {'':>10} {'':>6} {'':>7} {b.cpu_per_call_us:>8.2f} {'1.00x':>9}"
        )
        for c in usable:
            try:
                r = storm(c, rate, args.seconds)
            except (RuntimeError, AssertionError, subprocess.TimeoutExpired) as e:
                print(f"{c.name:<26} {rate:>8}  failed: {e}")
                continue
            ratio = r.cpu_per_call_us / b.cpu_per_call_us if b.cpu_per_call_us else float("nan")
            slow[(c.name, rate)] = ratio
            kept = (
                r.kept(args.seconds)
                if c.name.startswith("leakhunt")
                else (r.calls >= 0.95 * rate * args.seconds and c.name != "memleak")
            )
            if kept:
                best[c.name] = max(best.get(c.name, 0), rate)
            print(
                f"{c.name:<26} {rate:>8} {r.calls:>9} {'' if r.events is None else r.events:>10}"
                f" {'' if r.lost is None else r.lost:>6} {r.over_s:>7.2f} {r.cpu_per_call_us:>8.2f}"
                f" {ratio:>8.2f}x  {'yes' if kept else 'no'}{'  ' + r.note if r.note else ''}"
            )
    print("\nhighest rate kept (0 lost, ended on time, the target at its pace):")
    for c in usable:
        print(f"  {c.name:<26} {best.get(c.name, 0):>8,} calls/s")
    lh = best.get("leakhunt/bcc", 0)
    at = slow.get(("leakhunt/bcc", GOAL_SLOWDOWN_AT), float("nan"))
    print(
        f"\ngoal: keeps up at {GOAL_RATE:,}/s: {'met' if lh >= GOAL_RATE else 'MISSED'} ({lh:,}/s); "
        f"slowdown at {GOAL_SLOWDOWN_AT:,}/s at most {GOAL_SLOWDOWN}x: "
        f"{'met' if at <= GOAL_SLOWDOWN else 'MISSED'} ({at:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
