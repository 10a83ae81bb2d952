"""Page-fault evidence with bpftrace (probes/page_faults.bt), where BCC is not there or not chosen.

What bpftrace allows of the BCC source (trace.faults.FaultTracer): not-present faults counted in
the kernel by (pid, faulting ip, 2 MiB bucket) with exemplar stacks unwound here. What it does not:
sampling that follows the rate (one fault in ``every`` is counted for the whole run, chosen at
start), telling a memset's callers apart in the kernel, and netting out the pages given back. Its
view says so (``FaultView.netted`` is False), and the culprits built from it say so.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import threading
from collections import Counter

from leakhunt import resources
from leakhunt.errors import BackendUnavailable
from leakhunt.trace.bpftrace import BpftraceBackend, pt_regs_offset
from leakhunt.trace.faults import BUCKET_SHIFT, EXEMPLAR_EVERY, EXEMPLARS_PER_SITE, FaultView, toucher_of
from leakhunt.trace.unwind import CallerResolver, UserContext

PROBE = "page_faults.bt"
DUMP_MS = 500
START_TIMEOUT_S = 60.0
_COUNT = re.compile(rb"@f\[(\d+), (\d+), (\d+)\]: (\d+)")


def script_text(pids: tuple[int, ...], every: int = 1) -> str:
    """The probe with its #defines and the traced pids (bpftrace 0.17's #define takes no
    statements: the pids go in as lines of BEGIN)."""
    defines = {
        "BUCKET_SHIFT": BUCKET_SHIFT,
        "EVERY": every,
        "EXEMPLAR_PERIOD": every * EXEMPLAR_EVERY,
        "PT_REGS_OFFSET": pt_regs_offset(),
    }
    head = "".join(f"#define {k} {v}\n" for k, v in defines.items())
    text = resources.probe(PROBE).read_text()
    anchor = "\t/* the traced pids */"
    assert anchor in text, f"{PROBE} lost the line its traced pids go after"
    return head + text.replace(anchor, anchor + "".join(f"\n\t@traced[{p}] = 1;" for p in pids), 1)


class BpftraceFaultTracer:
    """FaultTracer's interface (start, stop, view, add_pid) over bpftrace's text output."""

    def __init__(self, pids: tuple[int, ...], every: int = 1) -> None:
        self.pids = set(pids)
        self.every = every
        self.sampled_ever = every > 1
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._pages: dict = {}
        self._dump: dict | None = None
        self._touchers: dict = {}
        self._exemplar: dict[int, list] = {}
        self._resolver = CallerResolver()
        self._started = threading.Event()
        self._stderr: list[str] = []
        self._reader: threading.Thread | None = None

    @staticmethod
    def unavailable_reason() -> str | None:
        return BpftraceBackend.unavailable_reason()  # the same needs: root, bpftrace, BTF

    def add_pid(self, pid: int) -> None:
        """bpftrace takes its pids at start: one that comes later is not counted."""
        if self._proc is None:
            self.pids.add(pid)

    def start(self) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise BackendUnavailable("bpftrace", reason)
        self._proc = subprocess.Popen(
            ["bpftrace", "-e", script_text(tuple(sorted(self.pids)), self.every), str(DUMP_MS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=PROBE, daemon=True)
        self._reader.start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if not self._started.wait(START_TIMEOUT_S) or self._proc.poll() is not None:
            self.stop()
            errors = [line for line in self._stderr if "ERROR" in line] or self._stderr or ["no message"]
            raise BackendUnavailable("bpftrace", f"cannot run {PROBE}: {errors[-1].strip()}")

    def _read_stderr(self) -> None:
        for line in iter(self._proc.stderr.readline, b""):
            self._stderr.append(line.decode(errors="replace").rstrip())
            del self._stderr[:-50]

    def _read(self) -> None:
        for line in iter(self._proc.stdout.readline, b""):
            try:
                self._line(line)
            except (ValueError, IndexError, struct.error):
                continue  # a line cut by bpftrace's exit
        self._started.set()

    def _line(self, line: bytes) -> None:
        tag = line[:2]
        if self._dump is not None:
            m = _COUNT.match(line)
            if m:
                pid, ip, bucket, n = (int(g) for g in m.groups())
                self._dump[(pid, (ip, 0), bucket)] = float(n * self.every)
            elif line.startswith(b"Z"):
                with self._lock:
                    self._pages, self._dump = self._dump, None
                self._started.set()
            return
        if tag == b"D\n":
            self._dump = {}
        elif tag in (b"X ", b"X2", b"X3", b"X4"):
            self._exemplar_line(tag, line.split())

    def _exemplar_line(self, tag: bytes, f: list[bytes]) -> None:
        pid = int(f[1])
        if tag == b"X ":
            self._exemplar[pid] = [int(f[2], 16), int(f[3], 16), int(f[4], 16), [int(x, 16) for x in f[5:]]]
            return
        part = self._exemplar.get(pid)
        if part is None:
            return
        part[3] += [int(x, 16) for x in f[2:]]
        if tag != b"X4":
            return
        del self._exemplar[pid]
        ip, sp, bp, words = part
        site = (pid, (ip, 0))
        with self._lock:
            counter = self._touchers.setdefault(site, Counter())
            if sum(counter.values()) >= EXEMPLARS_PER_SITE:
                return
        stack = struct.pack(f"<{len(words)}Q", *words)
        toucher = toucher_of(self._resolver, pid, UserContext(ip, sp, bp, stack))
        if toucher is not None:
            with self._lock:
                counter[toucher] += 1

    def view(self) -> FaultView:
        with self._lock:
            pages = dict(self._pages)
            touchers = {site: Counter(c) for site, c in self._touchers.items()}
        seen = round(sum(pages.values()))
        return FaultView(pages, touchers, self.sampled_ever, seen, netted=False)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGINT)  # END prints the last counts
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._reader is not None:
            self._reader.join(5)


def fault_source(pids: tuple[int, ...], backend: str = "auto"):
    """The page-fault source for a run on ``backend``: BCC's (netted, adaptive) unless bpftrace was
    asked for or BCC is not usable here and bpftrace is."""
    from leakhunt.trace.bcc import BccBackend  # noqa: PLC0415 - BCC's checks import nothing heavy
    from leakhunt.trace.faults import FaultTracer  # noqa: PLC0415

    if backend == "bpftrace" or (
        BccBackend.unavailable_reason() is not None and BpftraceFaultTracer.unavailable_reason() is None
    ):
        return BpftraceFaultTracer(pids)
    return FaultTracer(pids)
