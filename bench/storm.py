"""bench/storm: the incident's event storm, leakhunt against its peers, one run.

The target is fixtures/leakers/hook_storm: libucm's shape (every munmap of the process goes
through a hook whose pool grows; most munmaps are of ranges that are not mapped at all), paced
at R memory syscalls a second: 0.4R munmaps of holes and 0.3R balanced mmap/munmap pairs.

  kept      for each tracer, each rate for --seconds: kept when the tracer lost nothing, ended
            within --seconds + 2 s of its attach (SIGINT for the peers, which have no duration),
            and the target still made 95% of its calls. The highest rate kept is the result.
  slowdown  the target's CPU time per call, traced over untraced (getrusage of the target, so a
            tracer that burns its own CPU elsewhere does not hide), at 30k, 100k and 250k calls/s.
            The target is pinned to one CPU and the tracer to the others, traced or not.
  tracer%   the tracer's own CPU seconds over --seconds (a share of one core for a tracer that
            ends on time; the peers run on until the target has made its calls). Its reader: a BPF probe
            runs in the target and is in its slowdown): what deciding in the kernel saves
            against streaming every call (--all-events) is paid here, not by the target.
            A target that dies under a tracer is said (uprobes on code libucm patched crash it).

Contenders: leakhunt/bcc (the default: unmaps of untracked memory decided in the kernel),
leakhunt/bcc --all-events (every call to user space: the reader's own limit), leakhunt/bpftrace,
the floor (bench/floor_probe.py: a program on the same raw sys_exit tracepoint that only counts
the target's calls, what any tracer there costs), a bystander (leakhunt/bcc tracing another
process, a sleeping one, while the storm runs untraced: the tracepoint runs its programs at every
syscall of every process on the host, so this is what tracing one pid costs all the others),
BCC's memleak (uprobes on libc's mmap/munmap: the hook calls the raw syscall, so it sees none of
this; shown for its cost) and strace (-e trace=memory).

Goal: leakhunt keeps up at 250k calls/s, and slows the target at most 1.15x at 100k calls/s.
The floor's slowdown is printed beside it: the part of leakhunt's that no tracepoint program avoids.

--subject ucx runs the same storms on fixtures/leakers/ucx_storm instead: Debian's real UCX, its
registration cache queueing an invalidation from its memory pool for every munmap libucm's
patched code reports. Its hooks cost the target far more per call than hook_storm's, so the
rates it can make untraced are lower (a rate it cannot make is said, not counted as kept).

--rounds N runs every storm N times, interleaved (untraced, then each contender, again and
again), so that a slow minute of the VM falls on all alike: a slowdown is then the median of the
rounds' own ratios, printed with their range, and a rate is kept only when every round kept it.
One round's slowdown on this 2-core VM wanders by 15% either way; three rounds or more are what
a claim rests on.

--probe-cost adds a column: the mean ns per run of leakhunt's (and the floor's) busiest BPF
program (its run time over its run count, which the kernel keeps while
kernel.bpf_stats_enabled=1: the bench sets it for the run and puts it back). Its two clock reads per run are in that run's slowdown too.

    sudo .venv/bin/python bench/storm.py [--seconds 6] [--rates 30000,100000,250000,400000]
                                         [--rounds 3] [--probe-cost] [--subject hook|ucx]
                                         [--only NAMES]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
# The attach/detach machinery of bench/trace.py (a script, not a package: loaded by path).
_spec = importlib.util.spec_from_file_location("bench_trace", ROOT / "bench" / "trace.py")
bench_trace = importlib.util.module_from_spec(_spec)
sys.modules["bench_trace"] = bench_trace  # its dataclasses look their module up
_spec.loader.exec_module(bench_trace)
Contender, attach, detach = bench_trace.Contender, bench_trace.attach, bench_trace.detach

SUBJECTS = {
    "hook": ROOT / "fixtures" / "leakers" / "build" / "hook_storm",
    "ucx": ROOT / "fixtures" / "leakers" / "build" / "ucx_storm",
}
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
#: The target runs on the first CPU it may use and the tracer on the others, traced or not: left
#: free, the target's wakeups moved it between the CPUs and its cost per call wandered by 30%
#: between identical untraced runs; pinned, by 5%.
_MINE = sorted(os.sched_getaffinity(0))
TARGET_CPUS, TRACER_CPUS = ({_MINE[0]}, set(_MINE[1:])) if len(_MINE) > 1 else (set(), set())
#: A pause before each storm: the previous tracer's maps and programs are freed by kernel workers
#: after it exits, on every CPU, and that fell on the next run's target.
SETTLE_S = 2.0
SLOWDOWN_RATES = (30_000, 100_000, 250_000)
GOAL_RATE, GOAL_SLOWDOWN_AT, GOAL_SLOWDOWN = 250_000, 100_000, 1.15
FLOOR = "floor (counting probe)"
BYSTANDER = "bystander (bcc, other pid)"


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
    probe_ns: float | None = None  # mean ns per run of the tracer's busiest BPF program
    tracer_cpu_s: float | None = None  # the tracer's own CPU (its reader; the probes are the target's)

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
        Contender(BYSTANDER, lh + ["--backend", "bcc"], "tracing pid"),
        Contender(
            FLOOR,
            [
                sys.executable,
                str(ROOT / "bench" / "floor_probe.py"),
                "--pid",
                "{pid}",
                "--duration",
                f"{seconds}",
            ],
            "tracing pid",
        ),
        peers["memleak"],
        peers["strace"],
    ]


def ends_itself(c: Contender) -> bool:
    """It takes a duration and prints a JSON summary (leakhunt, the floor); the peers are stopped."""
    return c.name.startswith("leakhunt") or c.name in (FLOOR, BYSTANDER)


def busiest_program_ns(pid: int) -> float | None:
    """Mean ns per run of the BPF program that ran most among those ``pid`` and its children
    hold (fdinfo, stats on): leakhunt's bpftrace backend holds its programs in a bpftrace child."""
    try:
        pids = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return None
    best = None
    fds = []
    for p in pids:
        try:
            fds += [f"{p}/fdinfo/{fd}" for fd in os.listdir(f"/proc/{p}/fdinfo")]
        except OSError:
            continue
    for fd in fds:
        try:
            with open(f"/proc/{fd}") as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if "prog_type" not in info or "run_cnt" not in info:
            continue
        runs, ns = int(info["run_cnt"]), int(info["run_time_ns"])
        if runs and (best is None or runs > best[0]):
            best = (runs, ns)
    return best[1] / best[0] if best else None


class ProbeCost:
    """Polls a tracer's busiest program's cost while the storm runs: the tracer ends with its
    target, and its descriptors with it, so the last reading before that is kept."""

    def __init__(self, pid: int) -> None:
        self.pid, self.ns, self._stop = pid, None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.25):
            ns = busiest_program_ns(self.pid)
            if ns is not None:
                self.ns = ns

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.ns


def storm(
    subject: Path, contender: Contender | None, rate: int, seconds: float, probe_cost: bool = False
) -> Run:
    """One storm of ``seconds`` at ``rate`` calls/s, begun once the contender is attached."""
    time.sleep(SETTLE_S)
    holes, pairs = 0.4 * rate, 0.3 * rate
    argv = [str(subject), "--holes", str(holes), "--pairs", str(pairs), "--duration", str(seconds)]
    target = subprocess.Popen(
        [*argv, "--start-on-stdin", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    lost = events = probe_ns = tracer_cpu = None
    over, note, crashed = 0.0, "", ""
    other = None
    try:
        assert target.stdout.readline().startswith("ready")
        _pin(target.pid, TARGET_CPUS)
        traced = target.pid
        if contender is not None and contender.name == BYSTANDER:
            other = subprocess.Popen(["sleep", str(seconds + 120)])
            traced = other.pid
        att = attach(contender, traced) if contender else None
        if att is not None:
            _pin(att.proc.pid, TRACER_CPUS)
        cost = ProbeCost(att.proc.pid) if att is not None and probe_cost else None
        target.stdin.write("go\n")
        target.stdin.flush()
        began = time.monotonic()
        done = target.stdout.readline()
        _, status, usage = os.wait4(target.pid, 0)  # its own CPU, to its end
        target.returncode = 0
        if os.WIFSIGNALED(status) or not done.startswith("done"):
            crashed = f"the target died ({_how(status)}) under the tracer"
        if cost is not None:
            probe_ns = cost.stop()
        if att is not None and ends_itself(contender):
            tracer_cpu = _ended(att.proc.pid, seconds + 60)  # it ends on its own, at --duration
            if tracer_cpu is None:
                note = "did not end"
            over = max(0.0, time.monotonic() - began - seconds)
            if tracer_cpu is None:
                tracer_cpu = detach(att)
            else:
                att.proc.returncode = 0  # reaped by _ended
                time.sleep(0.2)  # the pump threads drain the pipes
            try:
                doc = json.loads("".join(att.out))
                lost, events = doc["lost_events"], doc["events"]
                if doc.get("backlog_events"):
                    note = f"backlog {doc['backlog_events']}"
            except ValueError:
                note = f"no summary: {''.join(att.err[-2:]).strip()[:80]}"
        elif att is not None:
            tracer_cpu = detach(att)
    finally:
        for proc in (target, other):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    fields = dict(kv.split("=") for kv in done.split()[1:]) if done.startswith("done") else {}
    calls = int(float(fields.get("holes", 0)) + 2 * float(fields.get("pairs", 0)))
    if contender is not None and contender.name == "memleak":
        note = "sees none: the hooks call the raw syscall, its uprobes are on libc's wrappers"
    note = crashed or note
    name = contender.name if contender else "untraced"
    return Run(
        name=name,
        rate=rate,
        calls=calls,
        target_cpu_s=usage.ru_utime + usage.ru_stime,
        lost=lost,
        over_s=over,
        events=events,
        note=note,
        probe_ns=probe_ns,
        tracer_cpu_s=tracer_cpu,
    )


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of pid and of its children on ``cpus`` (nothing on a 1-CPU machine)."""
    if not cpus:
        return
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return
    for proc in procs:
        try:
            tids = [t.id for t in proc.threads()]
        except psutil.Error:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def _ended(pid: int, timeout: float) -> float | None:
    """Wait for a child to exit on its own: its CPU seconds (its reaped children's included), or
    None when it is still running after ``timeout`` (wait4, not Popen.wait: the usage is wanted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, _, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return usage.ru_utime + usage.ru_stime
        time.sleep(0.05)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rates", default="30000,100000,250000,400000")
    ap.add_argument("--probe-cost", action="store_true", help="ns per run of leakhunt's BPF program")
    ap.add_argument("--subject", choices=sorted(SUBJECTS), default="hook", help="the storm's target")
    ap.add_argument(
        "--rounds", type=int, default=1, help="interleaved rounds of every run; medians are shown"
    )
    ap.add_argument("--only", help="comma-separated contender names (prefixes) to run; all by default")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/storm: needs root (BPF)")
        return 2
    args.target = SUBJECTS[args.subject]
    if not args.target.exists():
        subprocess.run(["make", "-C", str(ROOT / "fixtures" / "leakers")], check=True, capture_output=True)
    if not args.target.exists():
        print(f"bench/storm: {args.target.name} was not built (ucx_storm needs Debian's libucx-dev)")
        return 2
    rates = sorted(int(r) for r in args.rates.split(","))
    usable = []
    only = [n.strip() for n in args.only.split(",")] if args.only else None
    for c in contenders(args.seconds):
        if only is not None and not c.name.startswith(tuple(only)):
            continue
        if c.available:
            print(f"  {c.name}: skipped, {c.available}")
        else:
            usable.append(c)

    print(
        f"storm: {args.target.name} paced at R calls/s (0.4R munmaps of holes, 0.3R mmap/munmap pairs), {args.seconds:.0f}s each"
    )
    print(
        f"{'contender':<26} {'calls/s':>8} {'made':>9} {'tracer saw':>10} {'lost':>6} {'late s':>7}"
        f" {'us/call':>8} {'slowdown':>9} {'tracer%':>7}{'  ns/run' if args.probe_cost else ''}  kept"
    )
    stats_before = STATS.read_text().strip() if args.probe_cost and STATS.exists() else None
    if stats_before is not None:
        STATS.write_text("1")
    try:
        run_all(args, rates, usable)
    finally:
        if stats_before is not None:
            STATS.write_text(stats_before)
    return 0


def run_all(args: argparse.Namespace, rates: list[int], usable: list[Contender]) -> None:
    best: dict[str, int] = {}
    slow: dict[tuple[str, int], float] = {}
    for rate in rates:
        # Rounds interleave: the untraced run, then each contender, again and again, so that a
        # slow minute of the VM falls on all of them alike. A slowdown is the median of the
        # rounds' own ratios (each contender over the untraced run of its own round, so a round
        # in which a contender failed drops out of its ratios, not shifts them).
        bases: list[Run] = []
        runs: dict[str, list[tuple[Run, Run]]] = {c.name: [] for c in usable}  # (run, its round's base)
        for _ in range(args.rounds):
            base = storm(args.target, None, rate, args.seconds)
            bases.append(base)
            for c in usable:
                try:
                    r = storm(args.target, c, rate, args.seconds, args.probe_cost and ends_itself(c))
                    runs[c.name].append((r, base))
                except (RuntimeError, AssertionError, subprocess.TimeoutExpired) as e:
                    print(f"{c.name:<26} {rate:>8}  failed: {e}")
        b_us = statistics.median(b.cpu_per_call_us for b in bases)
        b_calls = min(b.calls for b in bases)
        print(
            f"{'untraced':<26} {rate:>8} {b_calls:>9} {'':>10} {'':>6} {'':>7} {b_us:>8.2f} {'1.00x':>9}"
            + ("" if b_calls >= 0.95 * rate * args.seconds else "  the target cannot make this rate untraced")
            + (f"  us/call {_spread([b.cpu_per_call_us for b in bases])}" if args.rounds > 1 else "")
        )
        for c in usable:
            if not runs[c.name]:
                continue
            rs = [r for r, _ in runs[c.name]]
            ratios = [r.cpu_per_call_us / b.cpu_per_call_us for r, b in runs[c.name] if b.cpu_per_call_us]
            ratio = statistics.median(ratios) if ratios else float("nan")
            slow[(c.name, rate)] = ratio
            kept = len(rs) == args.rounds and all(  # a round that failed did not keep up
                r.kept(args.seconds)
                if ends_itself(c)
                else (r.calls >= 0.95 * rate * args.seconds and c.name != "memleak")
                for r in rs
            )
            if kept and c.name != BYSTANDER:  # it traces nothing of the storm: nothing to keep
                best[c.name] = max(best.get(c.name, 0), rate)
            worst = max(rs, key=lambda r: (r.lost or 0, r.over_s))  # what a round did at its worst
            own = [
                r.tracer_cpu_s for r in rs if r.tracer_cpu_s is not None and r.tracer_cpu_s == r.tracer_cpu_s
            ]
            own_s = f"{statistics.median(own) / args.seconds:.0%}" if own else ""
            probes = [r.probe_ns for r in rs if r.probe_ns is not None]
            probe = (
                "" if not args.probe_cost else f"{f'{statistics.median(probes):.0f}' if probes else '':>8}"
            )
            notes = sorted({r.note for r in rs if r.note})
            spread = f"  ratios {_spread(ratios)}" if len(ratios) > 1 else ""
            print(
                f"{c.name:<26} {rate:>8} {min(r.calls for r in rs):>9}"
                f" {'' if worst.events is None else worst.events:>10}"
                f" {'' if worst.lost is None else worst.lost:>6} {worst.over_s:>7.2f}"
                f" {statistics.median(r.cpu_per_call_us for r in rs):>8.2f}"
                f" {ratio:>8.2f}x {own_s:>7}{probe}  {'' if c.name == BYSTANDER else 'yes' if kept else 'no'}"
                f"{spread}{'  ' + '; '.join(notes) if notes else ''}"
            )
    print("\nhighest rate kept (0 lost, ended on time, the target at its pace):")
    for c in usable:
        if c.name != BYSTANDER:
            print(f"  {c.name:<26} {best.get(c.name, 0):>8,} calls/s")
    lh = best.get("leakhunt/bcc", 0)
    at = slow.get(("leakhunt/bcc", GOAL_SLOWDOWN_AT), float("nan"))
    floor = slow.get((FLOOR, GOAL_SLOWDOWN_AT), float("nan"))
    print(
        f"\ngoal: keeps up at {GOAL_RATE:,}/s: {'met' if lh >= GOAL_RATE else 'MISSED'} ({lh:,}/s); "
        f"slowdown at {GOAL_SLOWDOWN_AT:,}/s at most {GOAL_SLOWDOWN}x: "
        f"{'met' if at <= GOAL_SLOWDOWN else 'MISSED'} ({at:.2f}x; the floor alone {floor:.2f}x)"
    )
    other = slow.get((BYSTANDER, GOAL_SLOWDOWN_AT))
    if other is not None:
        print(f"while it traces another pid, the storm's own process at {GOAL_SLOWDOWN_AT:,}/s: {other:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
