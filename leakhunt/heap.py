"""The Python heap beside RSS: memray tracking a Python target while leakhunt samples it, so a
report can show both. RSS that grows while the heap stays flat is the smoking gun of a leak no
heap profiler sees (raw mmap syscalls, /dev/shm, pinned buffers).

Two ways in: *attach* (``memray attach``, injected with gdb or lldb into a running interpreter;
only allocations made after the attach count, so it is growth that is compared) and *run*
(``python -m memray run`` wraps a command leakhunt starts). memray hooks the allocator and the
mmap/munmap *functions*; mappings made with ``syscall(SYS_mmap)`` or by the kernel on a driver's
behalf never reach it. The capture file stays in the recording (``memray flamegraph`` reads it);
its memory snapshots become the ``heap`` stream, which is all the report needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leakhunt.errors import BackendUnavailable
from leakhunt.heap_attach import REFUSED

HEAP = "heap"
CAPTURE = "memray.bin"
#: memray takes a memory snapshot every 10 ms; a stream point per this many seconds is plenty.
STREAM_STEP_S = 0.5
_PYTHON = ("python", "python3")


@dataclass(frozen=True)
class HeapSeries:
    """Heap bytes memray saw (allocations since tracking began) and memray's own RSS reading,
    on the sample timeline (seconds since the first sample)."""

    t: np.ndarray
    heap: np.ndarray
    rss: np.ndarray
    mode: str  # "attach" or "run"


def memray_unavailable_reason() -> str | None:
    try:
        import memray  # noqa: F401
    except ImportError:
        return "memray is not installed (pip install 'leakhunt[dev]' or pip install memray)"
    return None


def _require_memray() -> None:
    reason = memray_unavailable_reason()
    if reason:
        raise BackendUnavailable("memray", reason, "")


def is_python_command(argv: list[str]) -> bool:
    name = os.path.basename(argv[0]) if argv else ""
    return name.startswith(_PYTHON) and not name.endswith("-config")


def run_mode_argv(argv: list[str], capture: Path) -> list[str]:
    """``python [opts] script|-m mod|-c code args`` rewritten to run under memray."""
    _require_memray()
    if not is_python_command(argv) or len(argv) < 2:
        raise BackendUnavailable(
            "memray",
            f"--heap needs a Python command (python SCRIPT or python -m "
            f"MODULE), not {argv[0] if argv else 'nothing'}",
            "",
        )
    check = subprocess.run([argv[0], "-c", "import memray"], capture_output=True)
    if check.returncode != 0:
        raise BackendUnavailable(
            "memray", f"{argv[0]} cannot import memray", f"{argv[0]} -m pip install memray"
        )
    return [argv[0], "-m", "memray", "run", "--quiet", "--force", "-o", str(capture), *argv[1:]]


class HeapTracker:
    """memray attached to a running interpreter for the length of a run; ``stop`` detaches. If
    leakhunt dies first, a watchdog memray's payload carries into the target deactivates the
    tracker within a second or two (leakhunt.heap_attach)."""

    def __init__(self, pid: int, capture: Path, max_duration_s: float | None) -> None:
        _require_memray()
        self.pid = pid
        self.capture = Path(capture)
        self._attached = False
        argv = [sys.executable, "-m", "leakhunt.heap_attach", str(pid), str(self.capture), str(os.getpid())]
        if max_duration_s:
            argv += ["--duration", str(int(max_duration_s) + 1)]
        # gdb/lldb inject memray into the target; a failure is one line from memray.
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if cp.returncode == REFUSED:
            raise BackendUnavailable(
                "memray",
                f"not attached to pid {pid}: {cp.stderr.strip().splitlines()[0]}",
                "start the target under memray instead: leakhunt ci --heap -- python ...",
            )
        if cp.returncode != 0:
            why = (cp.stderr.strip() or cp.stdout.strip()).splitlines()
            raise BackendUnavailable(
                "memray",
                f"attach to pid {pid} failed: {why[-1] if why else cp.returncode}",
                "needs gdb or lldb and a Python 3.7+ target",
            )
        self._attached = True

    def stop(self) -> None:
        if not self._attached:
            return
        self._attached = False
        if shutil.which("gdb") or shutil.which("lldb"):
            # Fails harmlessly when tracking already ended (--duration elapsed, target exited).
            subprocess.run(
                [sys.executable, "-m", "memray", "detach", str(self.pid)], capture_output=True, timeout=120
            )

    def __enter__(self) -> HeapTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HeapRun:
    """memray beside one sampling run: ``attach`` to a pid or ``run_argv`` for a command, then
    ``finish`` once the run (and, in run mode, the command) is over. The capture goes into
    ``directory`` (a recording keeps it) or a temporary directory removed at ``finish``."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        _require_memray()
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="leakhunt-heap-")
        self.capture = Path(directory or self._tmp.name) / CAPTURE
        self.mode = ""
        self.records: list[dict] = []
        self.problem: str | None = None
        self._tracker: HeapTracker | None = None

    def attach(self, pid: int, duration_s: float | None) -> None:
        self.mode = "attach"
        self._tracker = HeapTracker(pid, self.capture, duration_s)

    def run_argv(self, argv: list[str]) -> list[str]:
        self.mode = "run"
        return run_mode_argv(argv, self.capture)

    def finish(self) -> None:
        """Detach (attach mode) and read the capture; a run mode command must have exited."""
        if self._tracker is not None:
            self._tracker.stop()
        try:
            if self.capture.exists():
                self.records = capture_records(self.capture)
            else:
                self.problem = "memray wrote no capture: no heap data"
        except OSError as e:
            self.problem = f"memray capture unreadable: {e}"
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()

    @property
    def growth(self) -> float | None:
        """Heap growth over the run, bytes (None without two snapshots)."""
        return float(self.records[-1]["heap"] - self.records[0]["heap"]) if len(self.records) >= 2 else None

    def write(self, writer) -> None:
        """The ``heap`` stream into a session recording."""
        writer.append_many(HEAP, self.records)


def capture_records(capture: Path, step_s: float = STREAM_STEP_S) -> list[dict]:
    """memray's memory snapshots thinned to one per ``step_s``: the ``heap`` stream's records."""
    import memray

    out: list[dict] = []
    last = -float("inf")
    for snap in memray.FileReader(str(capture)).get_memory_snapshots():
        ts = snap.time / 1000.0
        if ts - last >= step_s:
            out.append({"ts": ts, "heap": int(snap.heap), "rss": int(snap.rss)})
            last = ts
    return out


def read_heap(rec, t0: float | None) -> HeapSeries | None:
    """The heap series of a recording: its ``heap`` stream, else its memray capture (a run whose
    leakhunt died before writing the stream still has the capture)."""
    records = list(rec.records(HEAP))
    mode = str(rec.session.get("heap_mode", "attach"))
    if not records and (rec.dir / CAPTURE).exists() and memray_unavailable_reason() is None:
        try:
            records = capture_records(rec.dir / CAPTURE)
        except OSError as e:
            rec.problems.append(f"{CAPTURE}: unreadable ({e})")
    if not records:
        return None
    base = t0 if t0 is not None else records[0]["ts"]
    return HeapSeries(
        np.array([r["ts"] - base for r in records]),
        np.array([r["heap"] for r in records], float),
        np.array([r.get("rss", 0) for r in records], float),
        mode,
    )


def aligned_growth(
    t: np.ndarray, rss: np.ndarray, heap: HeapSeries
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RSS growth and heap growth from the first RSS sample taken once tracking had begun, at the
    sample times: before that sample the interpreter may still be starting (its libraries load),
    which is growth memray was not there to see."""
    i0 = int(np.searchsorted(t, heap.t[0]))
    if i0 >= len(t):
        return t[:0], rss[:0], rss[:0]
    tk = t[i0:]
    heap_at = np.interp(tk, heap.t, heap.heap)
    return tk, rss[i0:] - rss[i0], heap_at - heap_at[0]
