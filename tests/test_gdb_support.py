"""Helpers shared by the gdb backend's tests (no tests here): run a backend until it ends, and
tell whether a process is still running and untraced."""

from __future__ import annotations

import time
from pathlib import Path

from leakhunt.errors import LeakhuntError
from leakhunt.proc.target import open_target
from leakhunt.trace.backend import Backend
from leakhunt.trace.events import MmapEvent


def collect(backend: Backend, timeout: float = 60, until=lambda events: False) -> list[MmapEvent]:
    """Poll ``backend`` until it finishes on its own, ``until(events)`` holds, or ``timeout``."""
    events: list[MmapEvent] = []
    deadline = time.monotonic() + timeout
    while backend.finished is None and not until(events) and time.monotonic() < deadline:
        events += backend.poll(0.2)
    events += backend.poll(0)
    return events


def status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def tracer(pid: int) -> int:
    return status_field(pid, "TracerPid")


def wait_untraced(pid: int, timeout: float = 15) -> int:
    """TracerPid once it is 0, or what it still is after ``timeout``."""
    deadline = time.monotonic() + timeout
    while tracer(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return tracer(pid)


def makes_progress(pid: int, seconds: float = 1.0) -> bool:
    """The process keeps running: it goes to sleep and wakes up again (our leakers tick by usleep)."""
    before = status_field(pid, "voluntary_ctxt_switches")
    time.sleep(seconds)
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return status_field(pid, "voluntary_ctxt_switches") > before and state not in ("t", "T", "Z")


def alive(pid: int) -> bool:
    """Running, not a zombie its parent has yet to reap (Target.alive's own test)."""
    try:
        return open_target(pid).alive()
    except LeakhuntError:
        return False
