"""What happens at each breakpoint hit: one small state machine per hit, driven by MI records.

At the entry of ``syscall``/``mmap``... the thread is stopped; we send, in one write, the commands
that read what we need (thread id, ``-stack-list-frames``, Python frames, argument registers), a
temporary breakpoint for this thread at the return address, and ``-exec-continue``: gdb resumes the
thread as soon as it has answered, before we even parse the answers. At the return breakpoint we
read %rax (the returned address) and continue, in one write again: two short stops per hit.
Anything else that stops a thread is resumed at once. Symbol offsets are asked for afterwards,
while the thread runs.

Why not ``-exec-finish``: a wrapper that calls another traced function (libucm's mmap hook ends in
``syscall(SYS_mmap)``) stops the thread again before it returns, and gdb abandons a finish
interrupted by a breakpoint. Our own return breakpoints, conditional on the stack pointer of the
very call, survive nesting (and recursion): each hit of a nest returns in turn.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from leakhunt.gdb.budget import Budget, CostMeter
from leakhunt.gdb.frames import PythonFrame, Symbolizer, caller_of
from leakhunt.gdb.mi import Record, mi_quote
from leakhunt.gdb.sites import ARGUMENTS, Site
from leakhunt.proc.target import Target, shm_segment_size
from leakhunt.trace.events import EventKind, Frame, MmapEvent

#: Kinds whose stacks are worth the cost; releases carry none (unless asked) and are never sampled
#: away: the ledger must see every release, or a sampled mapping would look leaked forever.
STACK_KINDS = frozenset(
    {EventKind.MMAP, EventKind.MREMAP, EventKind.SHMAT, EventKind.MEMFD_CREATE, EventKind.BRK}
)

Callback = Callable[[Record], None]
Send = Callable[[list[tuple[str, Callback | None]]], None]


class Phase(Enum):
    ENTRY = "entry"  # stopped at the breakpoint
    RUNNING = "running"  # in the call, until the return breakpoint
    RETURNED = "returned"  # stopped at the return address


@dataclass(eq=False)
class Hit:
    number: int  # sequence number, names this hit's gdb convenience variable
    site: Site
    thread: str
    ts: float
    stopped_at: float
    wants_stack: bool
    phase: Phase = Phase.ENTRY
    stopped_s: float = 0.0
    frames: list[dict] | None = None
    python: list[PythonFrame] = field(default_factory=list)
    args: list[int] | None = None
    ret: int | None = None
    waiting: int = 0  # answers the event still needs
    resumed: bool = False
    return_frame: Frame | None = None  # the caller, when no stack is taken
    settled: bool = False  # emitted or lost


@dataclass(frozen=True)
class HitSettings:
    budget: Budget
    depth: int
    stacks: bool
    unmap_stacks: bool
    python_frames: bool


class HitHandler:
    def __init__(
        self,
        target: Target,
        sites: dict[str, Site],
        registers: dict[str, int],
        settings: HitSettings,
        symbolizer: Symbolizer,
        send: Send,
        emit: Callable[[MmapEvent], None],
        cost: CostMeter,
        on_return_address: Callable[[int], None] = lambda address: None,
    ) -> None:
        self.target = target
        self.sites = sites  # gdb breakpoint number -> site
        self.registers = registers  # register name -> gdb register number
        self.settings = settings
        self.symbolizer = symbolizer
        self.send = send
        self.emit = emit
        self.cost = cost
        self.on_return_address = on_return_address  # where a return breakpoint is about to go
        self.accepting = True  # False once the session winds down
        self.returns: dict[str, Hit] = {}  # return breakpoint number -> hit
        self.unfinished: set[Hit] = set()  # hits not emitted yet (running or awaiting answers)
        self.completed = 0
        self.lost = 0
        self.notes: list[str] = []
        self.python_frames = settings.python_frames  # off for good once gdb says it cannot
        self._threads: dict[str, tuple[int, str]] = {}  # gdb thread id -> (LWP, name)
        self._lookups: dict[int, list[Hit]] = {}  # address being symbolized -> hits waiting
        self._sequence = 0

    # -- records ----------------------------------------------------------------------------------

    def on_stopped(self, record: Record) -> None:
        payload = record.payload if isinstance(record.payload, dict) else {}
        thread = payload.get("thread-id")
        number = str(payload.get("bkptno"))
        if payload.get("reason") == "breakpoint-hit" and thread:
            hit = self.returns.pop(number, None)
            if hit is not None:
                self._returned(hit, record.received)
                return
            site = self.sites.get(number)
            if site is not None and self._room_for_one_more():
                self._begin(site, thread, record.received)
                return
        self.resume(thread)

    def _room_for_one_more(self) -> bool:
        budget = self.settings.budget.max_hits
        return self.accepting and (budget is None or self.completed + len(self.unfinished) < budget)

    def holding(self) -> set[str]:
        """Threads stopped at a hit right now, with our commands (and their resume) in flight."""
        return {
            h.thread
            for h in self.unfinished
            if h.phase is Phase.ENTRY or (h.phase is Phase.RETURNED and not h.resumed)
        }

    def on_thread_exited(self, thread: str) -> None:
        # gdb deletes the thread's return breakpoints with it; their calls never returned.
        for hit in [h for h in self.unfinished if h.thread == thread and not h.resumed]:
            self._lose(hit, f"thread {thread} exited during a call")
        self._threads.pop(thread, None)

    def resume(self, thread: str | None) -> None:
        """Never leave a thread stopped: continue it (or every thread when gdb named none)."""
        self.send([(f"-exec-continue --thread {thread}" if thread else "-exec-continue --all", None)])

    # -- one hit ----------------------------------------------------------------------------------

    def _begin(self, site: Site, thread: str, received: float) -> None:
        s = self.settings
        self._sequence += 1
        wants_stack = s.stacks and (site.kind in STACK_KINDS or s.unmap_stacks)
        hit = Hit(self._sequence, site, thread, time.time(), received, wants_stack)
        self.unfinished.add(hit)
        commands: list[tuple[str, Callback | None]] = []
        if thread not in self._threads:
            commands.append((f"-thread-info {thread}", self._answer(hit, self._thread_info)))
        if wants_stack:
            commands.append(
                (f"-stack-list-frames --thread {thread} 0 {s.depth - 1}", self._answer(hit, self._frames))
            )
            if self.python_frames:
                commands.append(
                    (f"-leakhunt-python-frames --thread {thread}", self._answer(hit, self._python))
                )
        else:
            commands.append(
                (
                    f"-data-evaluate-expression --thread {thread} {mi_quote('*(void **) $rsp')}",
                    self._answer(hit, self._return_address),
                )
            )
        numbers = " ".join(str(self.registers[r]) for r in site.registers)
        commands.append(
            (f"-data-list-register-values --thread {thread} x {numbers}", self._answer(hit, self._arguments))
        )
        if s.budget.every_nth > 1 and site.kind in STACK_KINDS:
            number = next(n for n, other in self.sites.items() if other is site)
            commands.append((f"-break-after {number} {s.budget.every_nth - 1}", None))
        # The return breakpoint: this thread only, and only when the stack pointer is back where
        # this very call's `ret` leaves it (a recursive or nested call to the same place is not us).
        sp = f"$lkhunt_sp{hit.number % 1024}"
        commands += [
            (f"-data-evaluate-expression --thread {thread} {mi_quote(f'{sp} = $rsp + 8')}", None),
            (
                f"-break-insert --thread {thread} -t -p {thread} -c {mi_quote(f'$rsp == {sp}')} "
                f"{mi_quote('*(*(void **) $rsp)')}",
                lambda r: self._armed(hit, r),
            ),
            (f"-exec-continue --thread {thread}", lambda r: self._running(hit, r)),
        ]
        self.send(commands)

    def _armed(self, hit: Hit, record: Record) -> None:
        payload = record.payload if isinstance(record.payload, dict) else {}
        bkpt = payload.get("bkpt")
        if record.message == "done" and isinstance(bkpt, dict):
            self.returns[str(bkpt.get("number"))] = hit
        else:
            self._lose(hit, f"no breakpoint at the return address: {_message(record)}")

    def _running(self, hit: Hit, record: Record) -> None:
        hit.stopped_s += record.received - hit.stopped_at
        if hit.phase is Phase.ENTRY:
            hit.phase = Phase.RUNNING

    def _returned(self, hit: Hit, received: float) -> None:
        hit.stopped_at = received
        hit.phase = Phase.RETURNED
        self.send(
            [
                (
                    f"-data-list-register-values --thread {hit.thread} x {self.registers['rax']}",
                    self._answer(hit, self._return_value),
                ),
                (f"-exec-continue --thread {hit.thread}", lambda r: self._resumed(hit, r)),
            ]
        )

    def _resumed(self, hit: Hit, record: Record) -> None:
        if record.message == "running":
            hit.stopped_s += record.received - hit.stopped_at
        hit.resumed = True
        self._complete(hit)

    # -- answers ----------------------------------------------------------------------------------

    def _answer(self, hit: Hit, handler: Callable[[Hit, dict], None]) -> Callback:
        hit.waiting += 1

        def callback(record: Record) -> None:
            if record.message == "done" and isinstance(record.payload, dict):
                handler(hit, record.payload)
            else:
                self._note(f"gdb refused a read during a hit: {_message(record)}")
            hit.waiting -= 1
            self._complete(hit)

        return callback

    def _thread_info(self, hit: Hit, payload: dict) -> None:
        for t in payload.get("threads", ()):
            self._threads[t.get("id")] = (_lwp(t.get("target-id", "")), t.get("name", ""))

    def _return_address(self, hit: Hit, payload: dict) -> None:
        value = str(payload.get("value", ""))
        if value.startswith("0x"):
            address = int(value.split()[0], 16)
            self.on_return_address(address)
            hit.return_frame = self.symbolizer.frame_at(address, value)

    def _frames(self, hit: Hit, payload: dict) -> None:
        hit.frames = list(payload.get("stack", ()))
        if len(hit.frames) > 1:
            self.on_return_address(int(hit.frames[1]["addr"], 16))
        for key in self.symbolizer.unknown(hit.frames):
            waiting = self._lookups.get(key)
            if waiting is None:  # ask once; hits that meet the same address meanwhile wait for it too
                self._lookups[key] = waiting = []
                self.send(
                    [
                        (
                            f"-data-evaluate-expression {mi_quote(f'(void *) {key:#x}')}",
                            lambda r, key=key: self._symbol(key, r),
                        )
                    ]
                )
            waiting.append(hit)
            hit.waiting += 1

    def _symbol(self, key: int, record: Record) -> None:
        payload = record.payload if isinstance(record.payload, dict) else {}
        self.symbolizer.learn(key, str(payload.get("value", "")))
        for hit in self._lookups.pop(key, ()):
            hit.waiting -= 1
            self._complete(hit)

    def _python(self, hit: Hit, payload: dict) -> None:
        for problem in ("unavailable", "error"):
            if payload.get(problem):
                self._note(f"Python frames {problem}: {payload[problem]}")
                self.python_frames = problem != "unavailable"
        hit.python = [
            PythonFrame(
                f.get("function", "?"), f.get("filename", "?"), int(f.get("line", 0)), int(f.get("level", -1))
            )
            for f in payload.get("frames", ())
        ]

    def _arguments(self, hit: Hit, payload: dict) -> None:
        values = {int(v["number"]): int(v["value"], 16) for v in payload.get("register-values", ())}
        hit.args = [values.get(self.registers[r], 0) for r in hit.site.registers]

    def _return_value(self, hit: Hit, payload: dict) -> None:
        values = payload.get("register-values", ())
        if values:
            hit.ret = _signed64(int(values[0]["value"], 16))

    # -- endings ----------------------------------------------------------------------------------

    def _complete(self, hit: Hit) -> None:
        if hit.settled or not (hit.phase is Phase.RETURNED and hit.resumed and hit.waiting == 0):
            return
        if hit.ret is None or hit.args is None:
            self._lose(hit, "the arguments or the returned value could not be read")
            return
        hit.settled = True
        self.unfinished.discard(hit)
        self.completed += 1
        self.cost.add_hit(hit.stopped_s)
        self.emit(self._event(hit))

    def _lose(self, hit: Hit, why: str) -> None:
        if hit.settled:
            return
        hit.settled = True
        self.unfinished.discard(hit)
        for number in [n for n, h in self.returns.items() if h is hit]:
            del self.returns[number]
        self.lost += 1
        self._note(why)

    def abandon(self) -> int:
        """At detach: the calls that have not returned yet are lost (detach resumes their threads)."""
        pending = list(self.unfinished)
        for hit in pending:
            self._lose(hit, "the session ended during a call")
        self.returns.clear()
        return len(pending)

    def _note(self, text: str) -> None:
        if text not in self.notes and len(self.notes) < 20:
            self.notes.append(text)

    def _event(self, hit: Hit) -> MmapEvent:
        fields = {name: value for name, value in zip(ARGUMENTS[hit.site.kind], hit.args) if name != "_"}
        if "fd" in fields:
            fields["fd"] = _signed32(fields["fd"])
        for name in ("prot", "flags"):
            if name in fields:
                fields[name] &= 0xFFFFFFFF
        if hit.site.kind is EventKind.SHMAT and not -4096 < hit.ret < 0:
            fields["length"] = shm_segment_size(self.target.pid, fields.get("fd", -1))
        stack = self.symbolizer.stack(hit.frames, self.settings.depth, hit.python) if hit.frames else None
        tid, name = self._threads.get(hit.thread, (0, ""))
        return MmapEvent(
            hit.ts,
            self.target.pid,
            tid or self.target.pid,
            hit.site.kind,
            ret=hit.ret,
            stack=stack,
            caller=caller_of(stack) if stack else hit.return_frame,
            comm=name or self.target.comm,
            **fields,
        )


def _message(record: Record) -> str:
    payload = record.payload if isinstance(record.payload, dict) else {}
    return str(payload.get("msg", record.message))


def _lwp(target_id: str) -> int:
    for marker in ("LWP ", "process "):
        if marker in target_id:
            digits = target_id.split(marker, 1)[1].split(")")[0].strip()
            if digits.isdigit():
                return int(digits)
    return 0


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value
