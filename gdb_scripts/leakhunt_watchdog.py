"""leakhunt_watchdog.py: runs inside gdb; detaches from the target and quits when leakhunt dies.

leakhunt starts gdb with LEAKHUNT_WATCHDOG_FD (the read end of a pipe whose only writer is
leakhunt) and LEAKHUNT_WATCHDOG_PID (leakhunt's pid, gdb's parent). A thread waits for that pipe
to reach end-of-file or for gdb's parent to change: both happen when leakhunt exits in any way,
SIGKILL included. It then asks gdb's main loop to delete every breakpoint, detach and quit, so
the target keeps running, untraced. (gdb also detaches by itself when its stdin closes; this
covers a stdin that some other process still holds open.)

Usage (leakhunt does it):  source gdb_scripts/leakhunt_watchdog.py
"""

import os
import select
import signal
import threading

import gdb  # noqa: F401  (only inside gdb)


def _abandon():
    for command in ("delete", "detach", "quit"):
        try:
            gdb.execute(command, to_string=True)
        except gdb.error:
            pass  # nothing to delete or detach: quit still detaches whatever is attached


def _watch(fd, parent):
    while True:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                if os.read(fd, 64) == b"":
                    break
            except OSError:
                break
        elif os.getppid() != parent:
            break
    gdb.post_event(_abandon)


def _start():
    fd = os.environ.get("LEAKHUNT_WATCHDOG_FD")
    parent = os.environ.get("LEAKHUNT_WATCHDOG_PID")
    if fd is None or parent is None:
        return
    # The thread must block every signal gdb handles itself: the kernel would otherwise deliver
    # SIGCHLD to it while gdb's main thread has it blocked around waitpid(), and gdb would miss
    # the wakeup of a target thread that hit a breakpoint, leaving that thread stopped forever.
    # gdb.Thread does exactly that (gdb >= 12); older gdbs get the mask blocked around start().
    thread_class = getattr(gdb, "Thread", None)
    if thread_class is not None:
        thread_class(
            target=_watch, args=(int(fd), int(parent)), name="leakhunt-watchdog", daemon=True
        ).start()
    else:
        everything = set(signal.Signals)
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, everything)
        try:
            threading.Thread(
                target=_watch, args=(int(fd), int(parent)), name="leakhunt-watchdog", daemon=True
            ).start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    gdb.write("leakhunt watchdog armed\n")


_start()
