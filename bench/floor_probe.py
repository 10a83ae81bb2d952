"""The floor under leakhunt's mmap tracer: what any tracer on the raw sys_exit tracepoint costs.

One BCC program on raw_syscalls:sys_exit, where leakhunt's bcc backend sits, that does the least
a tracer of one process's memory calls can: reads the syscall number, checks the pid and counts
the call in a per-CPU slot. No ledger, no ring buffer, no stack. Its slowdown of a target is the
part of leakhunt's that no program on this tracepoint can avoid: the kernel's syscall-tracing
path for every syscall of every task while a syscall tracepoint is enabled, and one BPF run.
bench/storm.py runs it beside leakhunt as a contender.

    sudo .venv/bin/python bench/floor_probe.py --pid PID [--duration 6]

Prints "tracing pid PID" on stderr once attached; at --duration, SIGINT or SIGTERM, one JSON line: the
calls it counted ("events") and "lost_events" (always 0: nothing is streamed).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leakhunt.trace.bcc import ensure_bcc_importable  # noqa: E402
from leakhunt.trace.events import SYSCALL_NUMBERS, EventKind  # noqa: E402

PROGRAM = """
#include <uapi/linux/ptrace.h>
BPF_PERCPU_ARRAY(calls, u64, 1);

RAW_TRACEPOINT_PROBE(sys_exit) {
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    u64 nr = 0;
    bpf_probe_read_kernel(&nr, 8, &regs->orig_ax);
    if (nr != NR_MMAP && nr != NR_MUNMAP)
        return 0;
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET)
        return 0;
    int zero = 0;
    u64 *n = calls.lookup(&zero);
    if (n)
        (*n)++;
    return 0;
}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--duration", type=float, default=6.0)
    args = ap.parse_args()
    why = ensure_bcc_importable()
    if why:
        print(f"floor_probe: {why}", file=sys.stderr)
        return 2
    from bcc import BPF  # noqa: PLC0415 - the OS's python3-bpfcc, made importable above

    numbers = {f"NR_{k.name}": SYSCALL_NUMBERS[k] for k in (EventKind.MMAP, EventKind.MUNMAP)}
    cflags = [f"-DTARGET={args.pid}", *(f"-D{k}={v}" for k, v in numbers.items())]
    bpf = BPF(text=PROGRAM, cflags=cflags)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"tracing pid {args.pid}", file=sys.stderr, flush=True)  # stdout holds the JSON alone
    stop.wait(args.duration)
    events = sum(bpf["calls"][0])
    bpf.cleanup()
    print(json.dumps({"events": events, "lost_events": 0}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
