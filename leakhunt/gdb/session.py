"""A gdb session on one live process: spawn gdb, attach without stopping the server, break on the
memory syscalls, hand every stop to HitHandler, and detach on every way out.

Ways out, and what each does: a budget or a stop request (Ctrl-C, SIGTERM, the caller's duration)
winds down (deletes the breakpoints, lets hits in flight return, detaches); the target exiting
ends the session with what was collected; gdb dying or hanging puts the original bytes back under
every breakpoint gdb may have left (BreakpointGuard); leakhunt dying (even SIGKILL) closes gdb's
input and the watchdog pipe, and gdb detaches by itself (gdb_scripts/leakhunt_watchdog.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from leakhunt.errors import LeakhuntError
from leakhunt.gdb.attach import attach, configure, setting, settle, unread_libraries
from leakhunt.gdb.budget import Budget, CostMeter
from leakhunt.gdb.frames import Symbolizer
from leakhunt.gdb.guard import BreakpointGuard
from leakhunt.gdb.hits import HitHandler, HitSettings
from leakhunt.gdb.memory import AddressSpace
from leakhunt.gdb.mi import GdbCommandError, GdbDied, GdbTimeout, MiChannel, Record, mi_quote
from leakhunt.gdb.preflight import check_access, tracer_pid
from leakhunt.gdb.sites import VIA_SYSCALL, VIA_WRAPPER, Site, plan_sites
from leakhunt.proc.target import Target, proc_read
from leakhunt.trace.events import EventKind, MmapEvent

DEFAULT_KINDS = frozenset({EventKind.MMAP, EventKind.MUNMAP, EventKind.MREMAP})
#: gdb cannot report the exit of a target killed while one of its threads sat at a breakpoint (its
#: pending exit status waits for a resume that fails), so the session also looks for itself.
ALIVE_CHECK_S = 0.5
SWEEP_S = 2.0


@dataclass(frozen=True)
class GdbConfig:
    gdb_path: str = "gdb"  # or cuda-gdb, or a gdb built elsewhere
    kinds: frozenset[EventKind] = DEFAULT_KINDS
    min_length: int = 0  # in the breakpoint condition: short calls never stop
    budget: Budget = Budget()
    stacks: bool = True
    depth: int = 128  # frames per stack at most
    unmap_stacks: bool = False  # stacks for munmap/shmdt too
    python_frames: bool = True  # when the target runs CPython with debug info
    vias: tuple[str, ...] = (VIA_SYSCALL, VIA_WRAPPER)
    attach_timeout: float = 120.0  # symbol loading of a big server takes a while
    grace_s: float = 2.0  # for hits in flight when winding down


@dataclass
class SessionEnd:
    reason: str = ""
    target_exited: bool = False
    detached: bool = False  # gdb confirmed the detach
    restored: int = 0  # breakpoint sites put back by the guard (gdb died or hung)
    tracer_left: int = 0  # TracerPid of the target afterwards (0 = untraced)


@dataclass
class SessionState:
    hits: int = 0
    lost: int = 0
    seen: int = 0  # condition-true hits gdb counted, sampled-away ones included
    notes: list[str] = field(default_factory=list)


class GdbSession:
    def __init__(self, target: Target, config: GdbConfig, emit: Callable[[MmapEvent], None]) -> None:
        self.target = target
        self.config = config
        self.emit = emit
        self.cost = CostMeter()
        self.end = SessionEnd()
        self.notes: list[str] = []
        self.sites: dict[str, Site] = {}  # gdb breakpoint number -> site
        self.mi: MiChannel | None = None
        self.handler: HitHandler | None = None
        self.space: AddressSpace | None = None
        self.guard: BreakpointGuard | None = None
        self.registers: dict[str, int] = {}
        self.python_frames = False
        self.sysroot: str | None = None  # where gdb reads the target's files (its own words)
        self.unread_libraries: list[str] = []  # libraries gdb has no symbols for
        self._callbacks: dict[int, Callable[[Record], None] | None] = {}
        self._times: dict[str, int] = {}
        self._attached = False
        self._armed = False  # a breakpoint may be in the target's code
        self._winding_until: float | None = None
        self._stop_reason: str | None = None
        self._started = 0.0
        self._next_alive_check = 0.0
        self._next_sweep = 0.0
        self._stopped_at_last_sweep: set[str] = set()
        self._ended = False
        self._finished = False
        self._group: str | None = None  # gdb's thread group (inferior) of the target
        self._exec_seen = False
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)

    # -- start ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Attach and insert the breakpoints; on any failure leave the target as it was, and raise."""
        access = check_access(self.target, self.config.gdb_path)
        self.space = AddressSpace(self.target)
        planned = plan_sites(self.space, self.config.kinds, self.config.min_length, self.config.vias)
        self.guard = BreakpointGuard(self.space)
        self.guard.protect_scratch_pad()
        for site in planned:
            self.guard.protect(site.address)
        self.mi = MiChannel(access.gdb)
        try:
            self.python_frames = configure(
                self.mi,
                self.target,
                self.space,
                access.foreign_mounts,
                self.config.python_frames and self.config.stacks,
                self._note,
            )
            started = time.monotonic()
            attach(self.mi, self.target, self.config.attach_timeout)
            self._attached = True  # from here on, every way out detaches
            self.registers = settle(self.mi, self.config.attach_timeout, self.cost, started)
            self.sysroot = setting(self.mi, "sysroot")
            self.unread_libraries = unread_libraries(self.mi)
            self._insert(planned)
        except BaseException:
            self.end.reason = "start failed"
            self._finish()
            raise
        self._started = time.monotonic()

    def _insert(self, planned: list[Site]) -> None:
        settings = HitSettings(
            self.config.budget,
            self.config.depth,
            self.config.stacks,
            self.config.unmap_stacks,
            self.python_frames,
        )
        self._armed = True
        for site in planned:
            condition = f"-c {mi_quote(site.condition)} " if site.condition else ""
            record = self.mi.request(f"-break-insert {condition}{site.location}")
            self.sites[record.payload["bkpt"]["number"]] = site
        self.handler = HitHandler(
            self.target,
            self.sites,
            self.registers,
            settings,
            Symbolizer(self.space),
            self._send,
            self.emit,
            self.cost,
            self.guard.protect,
        )

    # -- run --------------------------------------------------------------------------------------

    def request_stop(self, reason: str = "stopped") -> None:
        """Ask a running session to wind down and detach (from any thread, or a signal handler)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        try:
            os.write(self._wake_write, b"x")
        except OSError:
            pass

    def run(self) -> SessionEnd:
        """Serve hits until a budget, a stop request, the target's exit or gdb's death; always detach."""
        try:
            while not self._ended and self._serve_once():
                pass
        except GdbDied as e:
            self._gdb_lost(str(e))
        finally:
            self._finish()
        return self.end

    def _serve_once(self) -> bool:
        """Handle what gdb said within a quarter second; False once the session should end."""
        now = time.monotonic()
        if self._winding_until is None:
            reason = self._stop_reason or self.config.budget.exhausted(
                self.handler.completed, self._started, now
            )
            if reason:
                self._wind_down(reason)
        elif not self.handler.unfinished or now >= self._winding_until:
            return False
        records = self.mi.read(0.25, self._wake_read)
        self._drain_wake()
        for record in records:
            self._dispatch(record)
        if now >= self._next_alive_check:
            self._next_alive_check = now + ALIVE_CHECK_S
            if not self.target.alive():
                self._target_exited(exit_status_of(self.target))
        if now >= self._next_sweep and not self._ended:
            self._next_sweep = now + SWEEP_S
            self._send([("-thread-info", self._sweep)])
        return True

    def _sweep(self, record: Record) -> None:
        """The safety net: a thread gdb shows stopped at two sweeps in a row is resumed (a hit takes
        milliseconds; a thread stopped that long is one leakhunt lost track of)."""
        threads = (record.payload or {}).get("threads", []) if record.message == "done" else []
        stopped = {t.get("id") for t in threads if t.get("state") == "stopped"} - self.handler.holding()
        for thread in stopped & self._stopped_at_last_sweep:
            self._note(f"thread {thread} was left stopped: leakhunt resumed it")
            self.handler.resume(thread)
        self._stopped_at_last_sweep = stopped

    def _wind_down(self, reason: str) -> None:
        self.end.reason = self.end.reason or reason
        self.handler.accepting = False
        # Only the entry breakpoints: the return breakpoints of calls in flight still fire.
        self._send([(f"-break-delete {' '.join(self.sites)}", None)])
        grace = 0.5 if self._stop_reason else self.config.grace_s
        self._winding_until = time.monotonic() + grace

    def _dispatch(self, record: Record) -> None:
        if record.is_result:
            if record.token in self._callbacks:
                callback = self._callbacks.pop(record.token)
                if callback is not None:
                    callback(record)
                elif record.message == "error":
                    self._note(f"gdb: {(record.payload or {}).get('msg', 'error')}")
            return
        if record.kind != "notify":
            return
        payload = record.payload if isinstance(record.payload, dict) else {}
        if record.message == "stopped":
            reason = payload.get("reason", "")
            if reason.startswith("exited"):
                self._target_exited(payload)
            elif reason == "exec":
                self._exec(payload.get("new-exec", "a new program"))
            else:
                self.handler.on_stopped(record)
        elif record.message == "thread-exited":
            self.handler.on_thread_exited(payload.get("id"))
        elif record.message == "thread-group-exited" and "exit-code" in payload:
            self._target_exited(payload)
        elif record.message == "thread-group-started" and self._group is None:
            self._group = payload.get("id")  # our attach
        elif record.message == "thread-group-added" and self._group is not None:
            self._exec("a new program")  # follow-exec-mode new: the exec's new inferior
        elif record.message == "breakpoint-modified":
            bkpt = payload.get("bkpt", {})
            if bkpt.get("number") in self.sites:
                self._times[bkpt["number"]] = int(bkpt.get("times", 0))

    def _exec(self, program: str) -> None:
        """The target replaced its program: our breakpoints' addresses mean nothing in the new one
        (gdb fails to insert them there, leaving its thread stopped): delete them all, detach."""
        if self._exec_seen:
            return
        self._exec_seen = True
        self._note(f"the target called exec ({program}): leakhunt detached")
        self.end.reason = self.end.reason or "the target called exec"
        self.handler.accepting = False
        self._send([("-break-delete", None)])
        self._ended = True

    def _send(self, commands: list[tuple[str, Callable[[Record], None] | None]]) -> None:
        tokens = self.mi.send(*(command for command, _ in commands))
        for token, (_, callback) in zip(tokens, commands):
            self._callbacks[token] = callback

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_read, 64):
                pass
        except BlockingIOError:
            pass

    # -- endings ----------------------------------------------------------------------------------

    def _target_exited(self, payload: dict) -> None:
        if self.end.target_exited:
            return
        code = payload.get("exit-code")
        killer = payload.get("signal-name")
        how = f" (killed by {killer})" if killer else f" (exit status {int(code, 8)})" if code else ""
        self.end.target_exited = True
        self.end.reason = f"target exited{how}"
        self._ended = True

    def _gdb_lost(self, why: str) -> None:
        # The kernel detached the target when gdb died, with gdb's int3 bytes still in its code:
        # put the original bytes back now, before a running thread reaches one. (A thread that sat
        # at a breakpoint when gdb died was resumed onto it by the kernel at once: nobody can save
        # it; the hit budget and short stops keep that window small.)
        self.end.restored += self.guard.restore()
        self.end.reason = why
        self._note(f"{why} during the session")

    def _finish(self) -> None:
        """Detach (or restore), quit gdb, verify. Idempotent; never raises."""
        if self.mi is None or self._finished:
            return
        self._finished = True
        self._ended = True
        if self.handler is not None:
            self.handler.accepting = False  # stops that arrive while detaching are only resumed
            self.handler.abandon()
        try:
            if self._attached and not self._armed:
                # Stopped while attaching or reading symbols (Ctrl-C during a long `sharedlibrary`):
                # no byte of the target was written yet, so the kernel's detach when gdb dies is a
                # clean one, and immediate, where a polite detach would wait for gdb to finish.
                self.mi.kill()
                self.end.detached = True
            elif self._attached and not self.end.target_exited and self.mi.alive():
                self._detach()
        finally:
            self._quit_gdb()
            for fd in (self._wake_read, self._wake_write):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _detach(self) -> None:
        started = time.monotonic()
        try:
            self._request("-break-delete", 10)
            self._request(f"-target-detach {self.target.pid}", 15)  # by pid: an exec makes a new inferior
            self.end.detached = True
        except GdbCommandError as e:
            if "not being run" not in str(e):  # else the attach itself had failed: nothing to undo
                self._note(f"detach failed ({e}): restoring the target's code directly")
                self.end.restored += self.guard.restore()
        except (GdbDied, GdbTimeout) as e:
            self._note(f"detach failed ({e}): restoring the target's code directly")
            self.end.restored += self.guard.restore()
        self.cost.detach_s = time.monotonic() - started

    def _request(self, command: str, timeout: float) -> None:
        """Send one command and serve every other record until its answer (hits keep resuming)."""
        done: list[Record] = []
        self._send([(command, done.append)])
        deadline = time.monotonic() + timeout
        while not done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GdbTimeout(f"gdb did not answer {command} within {timeout:.0f}s")
            for record in self.mi.read(left):
                self._dispatch(record)
        if done[0].message == "error":
            raise GdbCommandError(str((done[0].payload or {}).get("msg", "error")))

    def _quit_gdb(self) -> None:
        mi = self.mi
        if mi.alive():
            try:
                mi.send("-gdb-exit")
            except GdbDied:
                pass
        mi.close()  # closes gdb's stdin and the watchdog pipe: a gdb that is still attached detaches
        if not mi.wait(10):
            # Hung: put the original bytes back while gdb still holds the threads, then kill it.
            self.end.restored += self.guard.restore()
            mi.kill()
        if self._attached and not self.end.target_exited and self.target.alive():
            if not self.end.detached:
                self.end.restored += self.guard.restore()  # gdb hung, or died: anything left
                self._note(
                    f"gdb did not detach: leakhunt put back the original code at "
                    f"{self.end.restored} breakpoint site(s) of {self.guard.addresses} it guards"
                )
            self.end.tracer_left = _tracer(self.target)
            if self.end.tracer_left == mi.pid:
                self._note(f"the target is still traced by gdb (pid {mi.pid})")

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # -- accounting -------------------------------------------------------------------------------

    def state(self) -> SessionState:
        handler = self.handler
        notes = self.notes + (handler.notes if handler else [])
        return SessionState(
            handler.completed if handler else 0,
            handler.lost if handler else 0,
            sum(self._times.values()),
            notes,
        )


def exit_status_of(target: Target) -> dict:
    """The exit of a dead target as MI would have reported it, from its zombie's /proc/PID/stat
    (field 52, a wait status) while its parent has not reaped it; empty when it is gone."""
    try:
        fields = proc_read(target.pid, "stat").rsplit(b")", 1)[1].split()
        status = int(fields[49])
    except (LeakhuntError, IndexError, ValueError):
        return {}
    if status & 0x7F:
        return {"signal-name": signal.Signals(status & 0x7F).name}
    return {"exit-code": oct(status >> 8 & 0xFF)[2:]}


def _tracer(target: Target) -> int:
    try:
        return tracer_pid(target.pid)
    except LeakhuntError:
        return 0


def run_in_thread(session: GdbSession) -> threading.Thread:
    """Serve the session in a thread of its own, so that a stopped target thread is answered at
    once whatever the caller does; a bug of ours ends the session (detached) with its reason."""

    def serve() -> None:
        try:
            session.run()
        except Exception as e:  # noqa: BLE001 - the session has detached (run's finally); say why it ended
            session.end.reason = f"leakhunt's gdb session failed: {e!r}"

    thread = threading.Thread(target=serve, name=f"leakhunt-gdb-{session.target.pid}", daemon=True)
    thread.start()
    return thread
