"""Read-ahead of the target while the interpreter imports.

`leakhunt maps --pid P` spends about 0.3 s importing numpy, click and rich before it can parse a
byte, and on a process with 50k mappings the kernel spends about as long formatting its smaps.
The read needs none of those imports, so the entry point starts it on a thread before them: the
kernel walks the target's mappings on one core while Python imports on the other. The thread
reads with the C helper, which holds no GIL for the whole file (the kernel hands smaps out a few
KB per read, and a Python loop would wait for the GIL ten thousand times). ``take`` hands the
bytes over. Anything unusual (another command, a pid that is not a number, an error while
reading) leaves nothing to take, and the ordinary read runs and reports errors as it always does.
"""

from __future__ import annotations

import os
import threading

_pending: dict[tuple[int, str], tuple[threading.Thread, list[bytes]]] = {}


def start(argv: list[str]) -> None:
    """Begin reading what the command line ``argv`` will want (today: `maps --pid P`'s smaps)."""
    pid = _maps_pid(argv)
    if pid is None:
        return
    box: list[bytes] = []

    def read() -> None:
        try:
            from leakhunt.proc import _smaps  # the C helper: no numpy; reads without the GIL
        except ImportError:
            return  # read in pieces from Python, this thread would wait for the GIL at each
        try:
            fd = os.open(f"{os.environ.get('LEAKHUNT_PROC', '/proc')}/{pid}/smaps", os.O_RDONLY)
        except OSError:
            return
        try:
            box.append(_smaps.read_fd(fd))
        except OSError:
            pass
        finally:
            os.close(fd)

    thread = threading.Thread(target=read, name="leakhunt-prefetch", daemon=True)
    thread.start()
    _pending[(pid, "smaps")] = (thread, box)


def take(pid: int, name: str) -> bytes | None:
    """The bytes read ahead for /proc/PID/NAME, once; None when none were (read it yourself)."""
    entry = _pending.pop((pid, name), None)
    if entry is None:
        return None
    thread, box = entry
    thread.join()
    return box[0] if box else None


def _maps_pid(argv: list[str]) -> int | None:
    args = argv[1:]
    if not args or args[0] != "maps":
        return None
    for i, arg in enumerate(args):
        if arg in ("--pid", "-p") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--pid="):
            value = arg.removeprefix("--pid=")
        else:
            continue
        return int(value) if value.isdigit() and int(value) > 0 else None
    return None
