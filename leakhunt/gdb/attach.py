"""Getting gdb onto a live process without stopping it: the session's settings, ``attach &``, the
libraries' symbols read while every thread runs, and the registers' numbers.

A plain attach stops every thread while gdb reads the symbols of every library (seconds for a
torch server, whose HTTP loop would stall); here one thread is stopped for the attach itself
(~0.1-0.3 s) and the symbols are read afterwards, the target running.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from leakhunt.errors import BackendUnavailable
from leakhunt.gdb.budget import CostMeter
from leakhunt.gdb.memory import AddressSpace
from leakhunt.gdb.mi import GdbCommandError, GdbTimeout, MiChannel
from leakhunt.gdb.preflight import explain_attach_error
from leakhunt.gdb.python_frames import python_frames_helper
from leakhunt.proc.target import Target
from leakhunt.resources import gdb_script

#: Settings the session cannot work without (the rest of leakhunt.gdb may fail on an older gdb).
REQUIRED_SETTINGS = {"non-stop": "on", "mi-async": "on"}


def configure(
    mi: MiChannel,
    target: Target,
    space: AddressSpace,
    foreign_mounts: bool,
    python_frames: bool,
    note: Callable[[str], None],
) -> bool:
    """gdb_scripts/leakhunt.gdb, the watchdog and the Python frame reader; True when the target
    gets Python frames."""
    lines = [line.strip() for line in gdb_script("leakhunt.gdb").read_text().splitlines()]
    for line in (line for line in lines if line and not line.startswith("#")):
        try:
            mi.console(line)
        except GdbCommandError as e:
            note(f"gdb setting skipped: {line} ({e})")
    for name, wanted in REQUIRED_SETTINGS.items():
        if setting(mi, name) != wanted:
            raise BackendUnavailable(
                "gdb",
                f"this gdb cannot run with {name} {wanted}: leakhunt would have "
                f"to stop every thread at each hit",
                "",
            )
    if foreign_mounts:
        # The target sees another filesystem (a container): read its libraries through its root.
        # (A recent gdb's default sysroot, "target:", enters the target's mount namespace by
        # itself when it may; /proc/PID/root works for any gdb, cuda-gdb included.) And load
        # only our own libthread_db, never a library from inside the container.
        mi.console(f"set sysroot /proc/{target.pid}/root")
        mi.console("set libthread-db-search-path $sdir")
    try:
        mi.console(f"source {gdb_script('leakhunt_watchdog.py')}")
    except GdbCommandError as e:
        note(f"gdb-side watchdog unavailable ({e}): gdb still detaches when leakhunt's pipe closes")
    return python_frames and python_frames_helper(mi, space, note)


def setting(mi: MiChannel, name: str) -> str | None:
    """The value gdb reports for one of its settings (``-gdb-show``)."""
    return (mi.request(f"-gdb-show {name}").payload or {}).get("value")


def unread_libraries(mi: MiChannel) -> list[str]:
    """The target's libraries (as it names them) whose symbols gdb could not read: their frames
    will have no function names (a sysroot that misses them, a file deleted since)."""
    try:
        libraries = (mi.request("-file-list-shared-libraries").payload or {}).get("shared-libraries", [])
    except GdbCommandError:
        return []  # an older gdb: nothing to say, not a reason to fail the session
    return [lib.get("target-name", "?") for lib in libraries if lib.get("symbols-loaded") != "1"]


def attach(mi: MiChannel, target: Target, timeout: float) -> None:
    """Attach (raises the one-line reason when gdb may not); the target keeps running."""
    try:
        # `attach &` in non-stop mode stops one thread, for the attach itself; with auto-solib-add
        # off (leakhunt.gdb) gdb reads no library's symbols yet.
        mi.console(f"attach {target.pid} &", timeout=timeout)
    except GdbCommandError as e:
        raise explain_attach_error(target, str(e)) from None
    except GdbTimeout:
        raise BackendUnavailable("gdb", f"gdb took more than {timeout:.0f}s to attach", "") from None


def settle(mi: MiChannel, timeout: float, cost: CostMeter, started: float) -> dict[str, int]:
    """After attach: every thread running again, the symbols read; the register numbers by name."""
    threads = (mi.request("-thread-info", timeout=timeout).payload or {}).get("threads", [])
    if any(t.get("state") == "stopped" for t in threads):
        mi.request("-exec-continue --all")
    cost.attach_s = time.monotonic() - started
    started = time.monotonic()
    try:
        mi.console("sharedlibrary", timeout=timeout)  # every thread runs meanwhile
        mi.console("set auto-solib-add on")  # libraries loaded later get symbols too
    except GdbTimeout:
        raise BackendUnavailable(
            "gdb", f"gdb took more than {timeout:.0f}s to read the target's symbols", ""
        ) from None
    cost.symbols_s = time.monotonic() - started
    # Only now does gdb know the target's architecture (before, it would name i386 registers).
    names = mi.request("-data-list-register-names").payload["register-names"]
    registers = {name: number for number, name in enumerate(names) if name}
    if "rdi" not in registers:
        raise BackendUnavailable("gdb", "the target is not an x86-64 process", "")
    return registers
