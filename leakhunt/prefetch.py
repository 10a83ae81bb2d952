"""Read-ahead of the target while the interpreter imports.

`leakhunt maps --pid P` spends about 0.3 s importing numpy, click and rich before it can parse a
byte, and on a process with 50k mappings the kernel spends about as long formatting its smaps.
The read needs none of those imports, so the entry point starts it on a thread before them: the
kernel walks the target's mappings on one core while Python imports on the other. The thread
reads with the C helper, which holds no GIL for the whole file (the kernel hands smaps out a few
KB per read, and a Python loop would wait for the GIL ten thousand times), then parses it with
the C parser, whose pass over the text also runs without the GIL. ``take`` hands the bytes and
the parse over. Anything unusual (another command, a pid that is not a number, an error while
reading) leaves nothing to take, and the ordinary read runs and reports errors as it always does;
text the C parser cannot take leaves the parse to the ordinary path too.
"""

from __future__ import annotations

import os
import threading

_pending: dict[tuple[int, str], tuple[threading.Thread, list]] = {}


def start(argv: list[str]) -> bool:
    """Begin reading what the command line ``argv`` will want (today: `maps --pid P`'s smaps).
    True when it did: the command is a one-shot read of a live process."""
    pid = _maps_pid(argv)
    if pid is None:
        return False
    box: list = []  # the bytes, then the C parser's result when it took them

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
            return
        finally:
            os.close(fd)
        try:
            box.append(_smaps.parse(box[0]))
        except (ValueError, MemoryError):
            pass  # the ordinary parse says what is wrong

    thread = threading.Thread(target=read, name="leakhunt-prefetch", daemon=True)
    thread.start()
    _pending[(pid, "smaps")] = (thread, box)
    return True


def take(pid: int, name: str) -> tuple[bytes, object] | None:
    """What was read ahead for /proc/PID/NAME, once: the bytes and the C parser's result (None
    when it did not parse them); None when nothing was read (read it yourself)."""
    entry = _pending.pop((pid, name), None)
    if entry is None:
        return None
    thread, box = entry
    thread.join()
    return (box[0], box[1] if len(box) > 1 else None) if box else None


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
