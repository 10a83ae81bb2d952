"""Who creates the shared objects a process holds (probes/shm_creators.c, BCC), host-wide.

The holder's traced mmaps say who keeps shared memory; the creator is often another process (a
DataLoader worker, an API process handing payloads to its engine). This tracer sees every
creation of a /dev/shm file, a memfd or a SysV segment on the host, with its creator's pid and
command, the size it was given, and its stack (DWARF-unwound from a copy of the stack, as the mmap
tracer's exemplars are). Objects are matched to what a holder maps by name pattern (and SysV
segments by shmid, the inode of their mapping).

It runs beside the mmap tracer in investigate when BCC works; creations are rare enough (at most
thousands a second) for a perf buffer read in a thread.
"""

from __future__ import annotations

import ctypes as ct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from leakhunt.errors import LeakhuntError
from leakhunt.proc.shmem import object_pattern
from leakhunt.proc.target import read_cmdline
from leakhunt.text import one_line
from leakhunt.trace.events import Stack
from leakhunt.trace.perf_program import PerfProgram
from leakhunt.trace.unwind import CallerResolver, UserContext, is_wrapper_module

PROBE = "shm_creators.c"
NAME_BYTES = 96
STACK_BYTES = 4096
KINDS = {1: "file", 2: "memfd", 3: "sysv"}
EV_CREATE, EV_SIZE = 1, 2
#: x86_64 syscall numbers the probe looks at.
NUMBERS = {
    "SC_OPEN": 2,
    "SC_OPENAT": 257,
    "SC_MEMFD_CREATE": 319,
    "SC_SHMGET": 29,
    "SC_FTRUNCATE": 77,
    "SC_FALLOCATE": 285,
    "SC_CLOSE": 3,
}
#: Stacks unwound per (pid, pattern): the rest of a creator's objects are counted, not unwound.
STACKS_PER_KIND = 4
#: Creations remembered (the oldest go first).
MAX_CREATIONS = 200_000


class _Event(ct.Structure):
    _fields_ = [
        ("type", ct.c_uint32),
        ("kind", ct.c_uint32),
        ("pid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("ts", ct.c_uint64),
        ("ret", ct.c_int64),
        ("size", ct.c_uint64),
        ("ip", ct.c_uint64),
        ("sp", ct.c_uint64),
        ("bp", ct.c_uint64),
        ("comm", ct.c_char * 16),
        ("name", ct.c_char * NAME_BYTES),
        ("nbytes", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("stack", ct.c_uint8 * STACK_BYTES),
    ]


def cflags() -> list[str]:
    defines = {
        **NUMBERS,
        "O_CREAT_FLAG": 0o100,
        "IPC_CREAT_FLAG": 0o1000,
        "NAME_BYTES": NAME_BYTES,
        "STACK_BYTES": STACK_BYTES,
        "EV_CREATE": EV_CREATE,
        "EV_SIZE": EV_SIZE,
        **{f"KIND_{v.upper()}": k for k, v in KINDS.items()},
    }
    return [f"-D{k}={v}" for k, v in defines.items()]


def object_name(kind: str, name: str, shmid: int) -> str:
    """The name a holder's mapping shows for this object (without ' (deleted)')."""
    if kind == "memfd":
        return f"/memfd:{name}"
    if kind == "sysv":
        return f"/SYSV (shmid {shmid})"
    return name


@dataclass
class Creator:
    """One process's creations of one kind of object (one name pattern)."""

    pid: int
    command: str
    pattern: str
    objects: int = 0
    bytes: int = 0  # sizes given with ftruncate/fallocate/shmget
    stack: Stack | None = None
    shmids: set[int] = field(default_factory=set)

    @property
    def origin(self) -> str:
        """The first frame outside the C library: what made the object."""
        if self.stack is None:
            return ""
        frame = next((f for f in self.stack.frames if not is_wrapper_module(f.library)), None)
        return str(frame).split("+")[0] if frame else ""

    def to_json(self) -> dict:
        return {
            "pid": self.pid,
            "command": self.command,
            "pattern": self.pattern,
            "objects": self.objects,
            "bytes": self.bytes,
            "origin": self.origin,
            "stack": [str(f) for f in self.stack.frames] if self.stack else [],
        }


def _command(pid: int) -> str:
    try:
        return one_line(read_cmdline(pid))[:120]
    except LeakhuntError:  # gone (or not ours) before we looked
        return ""


class CreatorTracer(PerfProgram):
    """Runs probes/shm_creators.c and keeps, per (pid, pattern), who created what."""

    probe = PROBE

    def __init__(self) -> None:
        super().__init__()
        self.creators: dict[tuple[int, str], Creator] = {}
        self._fds: dict[tuple[int, int], tuple[int, str]] = {}  # (pid, fd) -> creator key
        self._lock = threading.Lock()
        self._resolver = CallerResolver()
        self.events = 0

    def cflags(self) -> list[str]:
        return cflags()

    def on_event(self, data) -> None:
        e = ct.cast(data, ct.POINTER(_Event)).contents
        self.events += 1
        with self._lock:
            if e.type == EV_SIZE:
                key = self._fds.get((e.pid, e.ret))
                if key is not None and key in self.creators:
                    self.creators[key].bytes += int(e.size)
                return
            kind = KINDS.get(e.kind, "file")
            name = object_name(kind, e.name.decode("utf-8", "replace"), int(e.ret))
            pattern = "/SYSV*" if kind == "sysv" else object_pattern(name)
            key = (int(e.pid), pattern)
            creator = self.creators.get(key)
            if creator is None:
                if len(self.creators) >= MAX_CREATIONS:
                    return
                creator = self.creators[key] = Creator(int(e.pid), _command(e.pid), pattern)
            creator.objects += 1
            if kind == "sysv":
                creator.bytes += int(e.size)
                creator.shmids.add(int(e.ret))
            else:
                self._fds[(int(e.pid), int(e.ret))] = key
            if creator.stack is None or (
                creator.objects <= STACKS_PER_KIND and len(creator.stack.frames) < 3
            ):
                ctx = UserContext(e.ip, e.sp, e.bp, bytes(e.stack[: e.nbytes]))
                try:
                    creator.stack = self._resolver.unwind(int(e.pid), ctx)
                except Exception:  # noqa: BLE001 - a process gone before we read its maps
                    pass

    def of(self, pattern: str, shmids: Iterable[int] = ()) -> list[Creator]:
        """The creators of objects of this pattern (SysV: of these shmids), most objects first."""
        ids = set(shmids)
        with self._lock:
            found = [c for (pid, p), c in self.creators.items() if p == pattern or (ids and c.shmids & ids)]
        return sorted(found, key=lambda c: -c.objects)
