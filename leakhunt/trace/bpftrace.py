"""The bpftrace backend: runs probes/mmap_ledger.bt and reads its text output.

The script keeps the common case in kernel maps and prints only what it cannot resolve, plus a
dump of its maps every DUMP_MS; a reader thread queues stdout lines and poll() parses them into
the raw records of trace.kernel_backend. ``python -m leakhunt.trace.bpftrace PID`` prints the
script with its #defines, to run it by hand.
"""

from __future__ import annotations

import gzip
import os
import platform
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np

from leakhunt import resources
from leakhunt.errors import BackendUnavailable
from leakhunt.trace.backend import TraceOptions
from leakhunt.trace.events import (
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MREMAP_DONTUNMAP,
    SYSCALL_KINDS,
    SYSCALL_NUMBERS,
)
from leakhunt.trace.kernel_backend import (
    KernelLedgerBackend,
    RawCall,
    RawDump,
    RawExemplar,
    RawLifecycle,
    raw_calls,
    root_problem,
)
from leakhunt.trace.ledger import SiteCounts

PROBE = "mmap_ledger.bt"
DUMP_MS = 250
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
QUEUE_LINES = 200_000
#: sizeof(struct pt_regs) on x86_64: the user registers sit at the top of the task's kernel stack.
PT_REGS_SIZE = 168

_LIVE = re.compile(rb"@live\[(\d+), (\d+)\]: \((\d+), (\d+), (\d+), (-?\d+), (\d+), (-?\d+)\)")
_SITE = re.compile(rb"@(mapped|unmapped|count)\[(\d+), (\d+), (\d+)\]: (\d+)")
_NSYS = re.compile(rb"@nsys\[(\d+)\]: (\d+)")
_SCALAR = re.compile(rb"@(filtered|failed|full): (\d+)")
_LOST = re.compile(rb"Lost (\d+) events")


def kernel_config() -> dict[str, str]:
    """The running kernel's build configuration, from wherever the distribution keeps it."""
    release = platform.release()
    for path in ("/proc/config.gz", f"/boot/config-{release}", f"/lib/modules/{release}/build/.config"):
        try:
            raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
        except OSError:
            continue
        out = {}
        for line in raw.decode(errors="replace").splitlines():
            key, sep, value = line.partition("=")
            if sep and key.startswith("CONFIG_"):
                out[key] = value
        return out
    return {}


def pt_regs_offset(config: dict[str, str] | None = None) -> int:
    """Offset of the user pt_regs from task->stack (what task_pt_regs() computes in the kernel)."""
    config = kernel_config() if config is None else config
    order = 2 + (1 if config.get("CONFIG_KASAN") == "y" else 0)  # THREAD_SIZE_ORDER
    padding = 16 if config.get("CONFIG_X86_FRED") == "y" else 0  # TOP_OF_KERNEL_STACK_PADDING
    return (4096 << order) - padding - PT_REGS_SIZE


def perf_pages(total_mib: int = 64) -> int:
    """Pages of each CPU's perf buffer: about ``total_mib`` in all, a power of two, 64..4096."""
    per_cpu = total_mib * 256 // max(1, os.cpu_count() or 1)
    pages = 64
    while pages * 2 <= min(per_cpu, 4096):
        pages *= 2
    return pages


def script_text(
    pid: int, follow: bool = False, min_len: int = 0, stream_all: bool = False, existing: tuple[int, ...] = ()
) -> str:
    """The probe with the #defines it expects: the facts live in leakhunt.trace.events. ``existing``
    (with follow): processes already under the target, in its set of traced pids from the start."""
    defines = {
        "TARGET": pid,
        "FOLLOW": int(follow),
        "MIN_LEN": min_len,
        "STREAM_ALL": int(stream_all),
        "PT_REGS_OFFSET": pt_regs_offset(),
        "MAP_FIXED": MAP_FIXED,
        "MAP_FIXED_NOREPLACE": MAP_FIXED_NOREPLACE,
        "MREMAP_DONTUNMAP": MREMAP_DONTUNMAP,
    }
    defines.update({f"NR_{kind.name}": nr for kind, nr in SYSCALL_NUMBERS.items()})
    head = "".join(f"#define {k} {v}\n" for k, v in defines.items())
    text = resources.probe(PROBE).read_text()
    if follow and existing:  # bpftrace 0.17's #define takes no statements: the lines go in as text
        root = "\t@traced[TARGET] = 1;"
        assert root in text, f"{PROBE} lost the line that starts its set of traced pids"
        text = text.replace(root, root + "".join(f"\n\t@traced[{p}] = 1;" for p in existing), 1)
    return head + text


class BpftraceBackend(KernelLedgerBackend):
    name = "bpftrace"
    caveat = (
        "it cannot decide in the kernel that an unmap touches nothing traced: under libucm's hooks "
        "(tens of thousands of munmaps of holes a second) it streams every one as text and falls "
        "behind; auto picks bcc"
    )
    takes_existing = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        problem = root_problem()
        if problem:
            return problem
        if shutil.which("bpftrace") is None:
            return "bpftrace is not installed"
        if not os.path.exists("/sys/kernel/btf/vmlinux"):
            return "the kernel has no BTF (/sys/kernel/btf/vmlinux), which the probe needs for task_struct"
        return None

    def __init__(self, target, options: TraceOptions) -> None:
        super().__init__(target, options)
        self._proc: subprocess.Popen | None = None
        # Bounded: if parsing falls behind, bpftrace blocks on its stdout, its perf buffers fill and
        # the kernel counts what it drops (bpftrace prints "Lost N events"): memory stays bounded.
        self._lines: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_LINES)
        self._stderr: list[str] = []
        self._lost_count = 0
        self._dump: RawDump | None = None  # being parsed
        self._dump_ready: RawDump | None = None
        self._exemplar: dict[int, list] = {}
        self._ended = False
        self._ready_records: list = []  # parsed before poll() was first called
        self._site_acc: dict = {}
        self._scalars: dict[str, int] = {}

    def start(self) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise BackendUnavailable(self.name, reason)
        env = dict(os.environ)
        env["BPFTRACE_MAP_KEYS_MAX"] = str(self.options.extra.get("max_mappings", 65536))
        env["BPFTRACE_PERF_RB_PAGES"] = str(self.options.extra.get("perf_pages", perf_pages()))
        text = script_text(
            self.target.pid,
            self.options.follow,
            self.options.min_length,
            bool(self.options.extra.get("stream_all")),
            self.options.existing,
        )
        self._proc = subprocess.Popen(
            ["bpftrace", "-e", text, str(DUMP_MS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, args=(self._proc.stdout, self._lines), daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()
        try:
            self._wait_attached()
        except BaseException:
            self._shutdown()  # an error, a timeout or Ctrl-C while attaching: no bpftrace left behind
            raise
        self._started = True
        self._check_patched()

    def _wait_attached(self) -> None:
        """Until the first dump: by then every probe is attached."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while self._dump_ready is None:
            if self._proc.poll() is not None and self._lines.empty():
                raise BackendUnavailable(
                    self.name, self._failure() or f"bpftrace exited with {self._proc.returncode}"
                )
            if time.monotonic() > deadline:
                raise BackendUnavailable(self.name, f"bpftrace did not start within {START_TIMEOUT_S:.0f}s")
            self._ready_records += self._drain(0.1)

    @property
    def finished(self) -> str | None:
        if self._ended and not self._stopped:
            return f"bpftrace exited on its own: {self._failure() or 'no message'}"
        return None

    def _failure(self) -> str:
        lines = [line for line in self._stderr if "RLIMIT_MEMLOCK" not in line and line.strip()]
        errors = [line for line in lines if "ERROR" in line]
        return (errors or lines or [""])[-1].strip()

    @staticmethod
    def _pump(stream, out: queue.Queue) -> None:
        for line in iter(stream.readline, b""):
            out.put(line)
        out.put(None)

    def _pump_stderr(self) -> None:
        assert self._proc is not None
        for line in iter(self._proc.stderr.readline, b""):
            text = line.decode(errors="replace").rstrip()
            m = _LOST.search(line)
            if m:
                self._lost_count += int(m.group(1))
            self._stderr.append(text)
            del self._stderr[:-50]

    # -- reading -------------------------------------------------------------------------------

    def _read(self, timeout: float) -> tuple[list[np.ndarray], list, RawDump | None]:
        self._dump_ready = None
        deadline = time.monotonic() + timeout
        records = self._ready_records
        self._ready_records = []
        while self._dump_ready is None and not self._ended:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            records += self._drain(left)
        records += self._drain(0)
        return _split(records) + (self._dump_ready,)

    def _drain(self, timeout: float) -> list:
        """Parse queued lines; block up to ``timeout`` for the first one."""
        records = []
        try:
            line = self._lines.get(timeout=timeout) if timeout > 0 else self._lines.get_nowait()
        except queue.Empty:
            return records
        while True:
            if line is None:
                self._ended = True
                break
            rec = self._parse(line)
            if rec is not None:
                records.append(rec)
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
        return records

    def _parse(self, line: bytes):
        tag = line[:2]
        if self._dump is not None:
            return self._parse_dump_line(line)
        if tag == b"E ":
            f = line.split()
            words = struct.pack(f"<{len(f) - 14}Q", *(int(x, 16) for x in f[14:]))
            return RawCall(
                int(f[1]),
                int(f[2]),
                int(f[3]),
                int(f[4]),
                tuple(int(x, 16) for x in f[5:10]),
                int(f[10]),
                int(f[11], 16),
                int(f[12], 16),
                int(f[13], 16),
                words,
            )
        if tag in (b"X ", b"X2", b"X3", b"X4"):
            return self._parse_exemplar(line)
        if tag == b"P ":
            f = line.split()
            return RawLifecycle(f[1].decode(), int(f[2]), int(f[3]), int(f[4]) if len(f) > 4 else 0)
        if tag == b"D ":
            self._dump = RawDump(int(line.split()[1]), [], {}, {}, 0, 0, 0)
            self._site_acc = {}
            self._scalars = {}
            return None
        if tag == b"Q\n":
            self._ended = True
            return None
        m = _LOST.search(line)
        if m:
            self._lost_count += int(m.group(1))
        return None

    def _parse_exemplar(self, line: bytes):
        f = line.split()
        pid = int(f[1])
        if f[0] == b"X":
            self._exemplar[pid] = [
                int(f[2]),
                int(f[3], 16),
                int(f[4], 16),
                int(f[5], 16),
                int(f[6], 16),
                [int(x, 16) for x in f[7:23]],
            ]
            return None
        parts = self._exemplar.get(pid)
        if parts is None:
            return None
        parts[5].extend(int(x, 16) for x in f[2:18])
        if f[0] != b"X4":
            return None
        del self._exemplar[pid]
        ts, ip, ra, sp, bp, words = parts
        if len(words) != 64:
            return None  # interleaved with another thread's exemplar: drop it, the next one comes
        return RawExemplar(pid, ts, ip, ra, sp, bp, struct.pack("<64Q", *words))

    def _parse_dump_line(self, line: bytes):
        dump = self._dump
        assert dump is not None
        if line.startswith(b"@live["):
            m = _LIVE.match(line)
            if m and m.group(3) != b"0":  # length 0: a tombstone (see the probe's header)
                pid, addr, length, ip, ra, ts, flags, fd = (int(x) for x in m.groups())
                dump.live.append((pid, addr, length, ip, ra, 0, ts, flags, fd))  # no paths in bpftrace
        elif line.startswith((b"@mapped[", b"@unmapped[", b"@count[")):
            m = _SITE.match(line)
            if m:
                key = (int(m.group(2)), int(m.group(3)), int(m.group(4)), 0)
                self._site_acc.setdefault(key, {})[m.group(1).decode()] = int(m.group(5))
        elif line.startswith(b"@nsys["):
            m = _NSYS.match(line)
            if m and int(m.group(1)) in SYSCALL_KINDS:
                dump.syscalls[SYSCALL_KINDS[int(m.group(1))].value] = int(m.group(2))
        elif line.startswith(b"@"):
            m = _SCALAR.match(line)
            if m:
                self._scalars[m.group(1).decode()] = int(m.group(2))
        elif line.startswith(b"Z"):
            scalars = self._scalars
            sites = {
                k: SiteCounts(v.get("count", 0), v.get("mapped", 0), v.get("unmapped", 0))
                for k, v in self._site_acc.items()
            }
            self._dump_ready = dump._replace(
                sites=sites,
                filtered=scalars.get("filtered", 0),
                failed=scalars.get("failed", 0),
                full=scalars.get("full", 0),
            )
            if self._dump_ready.full:
                self.note_once(
                    "the kernel map of live mappings filled up: later mappings are tracked in "
                    "user space (raise TraceOptions.extra['max_mappings'])"
                )
            self._dump = None
        return None

    def _lost(self) -> int:
        return self._lost_count

    # -- stopping ------------------------------------------------------------------------------

    def _shutdown(self) -> tuple[list[np.ndarray], list, RawDump | None]:
        proc = self._proc
        records: list = []
        final = None
        if proc is not None and proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGINT)  # END prints the final dump, then bpftrace exits
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while not self._ended and time.monotonic() < deadline:
                self._dump_ready = None
                records += self._drain(0.2)
                final = self._dump_ready or final
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None
        return _split(records) + (final,)


def _split(records: list) -> tuple[list[np.ndarray], list]:
    """Parsed records as the kernel backend takes them: calls as RAW_CALLS rows, the rest as is."""
    calls = [r for r in records if isinstance(r, RawCall)]
    return ([raw_calls(calls)] if calls else []), [r for r in records if not isinstance(r, RawCall)]


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m leakhunt.trace.bpftrace PID   (prints the script to run by hand)")
    sys.stdout.write(script_text(int(sys.argv[1])))
