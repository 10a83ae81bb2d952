"""memray attach with a watchdog in the target: run by HeapTracker as
``python -m leakhunt.heap_attach PID CAPTURE OWNER_PID [--duration S]``.

`memray attach` leaves its tracker running in the target until `memray detach` or its
``--duration``: when leakhunt is killed (SIGKILL, the OOM killer) nothing detaches, and the
target goes on paying for allocation tracking and filling a capture file, for ever. This sends
memray's own attach payload through memray's own injection channel (gdb or lldb), followed by a
watchdog thread that deactivates the tracker once leakhunt's process is gone: checked each second
by pid and start time, so that a reused pid is not taken for it. gdb's guard gives the same
promise for breakpoints. It runs as its own process, so that leakhunt never imports memray.

memray injects by calling dlopen inside the target through gdb. Where gdb cannot restore the
registers after such a call (gdb.preflight.gdb_call_hazard), that would leave the target running
on corrupted registers: nothing is injected then. (lldb 14, memray's other way in, hung in its
attach on the machine where this was seen.)

What an attach leaves in the target, by memray's design: its extension module, and one pipe pair
its native tracker opens once per process and reuses for every later tracker (memray never closes
it; closing it from outside would break the next attach).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from leakhunt.gdb.preflight import gdb_call_hazard

#: The exit status when memray's injection would corrupt the target: its first line says why.
REFUSED = 3

#: Appended to memray's attach payload, in the same namespace (memray, deactivate_last_tracker,
#: threading). Formatted with %: memray's payload is a str.format template, this is not.
WATCHDOG = """
def _leakhunt_watchdog(owner, start, mine):
    import time

    def alive():
        try:
            with open("/proc/%%d/stat" %% owner, "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[19] == start
        except (OSError, IndexError):
            return False

    while getattr(memray, "_last_tracker", None) is mine:
        if not alive():
            deactivate_last_tracker()
            return
        time.sleep(1)


if getattr(memray, "_last_tracker", None) is not None:
    threading.Thread(
        target=_leakhunt_watchdog,
        args=(%d, %r, memray._last_tracker),
        name="leakhunt-watchdog",
        daemon=True,
    ).start()
"""


def start_time(pid: int) -> bytes:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22), as the
    watchdog reads it."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[19]


def payload(capture: str, owner: int, duration: int | None) -> str:
    import memray
    from memray.commands.attach import PAYLOAD

    destination = memray.FileDestination(path=os.path.abspath(capture), overwrite=True, compress_on_exit=True)
    tracker = (
        f"memray.Tracker(destination=memray.{destination!r}, native_traces=False, "
        f"follow_fork=False, trace_python_allocators=False)"
    )
    mode = "FOR_DURATION" if duration else "ACTIVATE"
    return PAYLOAD.format(tracker_call=tracker, mode=mode, duration=duration) + WATCHDOG % (
        owner,
        start_time(owner),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m leakhunt.heap_attach", description=__doc__.splitlines()[0])
    ap.add_argument("pid", type=int)
    ap.add_argument("capture")
    ap.add_argument("owner", type=int, help="the process whose death ends the tracking")
    ap.add_argument("--duration", type=int, default=None)
    a = ap.parse_args(argv)
    from memray._errors import MemrayCommandError
    from memray.commands.attach import AttachCommand, recvall

    try:
        command = AttachCommand()
        debugger = command.resolve_debugger("auto")
        if debugger == "gdb" and (hazard := gdb_call_hazard("gdb")) is not None:
            print(hazard, file=sys.stderr)
            return REFUSED
        client = command.inject_control_channel(debugger, a.pid)
        client.sendall(payload(a.capture, a.owner, a.duration).encode())
        client.shutdown(socket.SHUT_WR)
        error = recvall(client)
    except (MemrayCommandError, OSError) as e:
        print(f"memray attach: {e}", file=sys.stderr)
        return 1
    if error:
        print(f"memray attach: tracking did not start in the target: {error.strip()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
