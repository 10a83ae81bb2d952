"""The common event every tracer backend produces, and the stacks attached to it.

Backends differ (bpftrace, BCC, gdb, perf) but emit the same records, so the ledger, the
correlator and the reports never know where an event came from. A Stack is usually partial:
glibc has no frame pointers, so a BPF user stack stops at ``__mmap64`` or ``syscall``; the
frame that matters is the *caller of the wrapper*, which the backends recover separately.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class EventKind(str, Enum):
    MMAP = "mmap"
    MUNMAP = "munmap"
    MREMAP = "mremap"
    BRK = "brk"
    SHMAT = "shmat"
    SHMDT = "shmdt"
    MEMFD_CREATE = "memfd_create"

    def __str__(self) -> str:
        return self.value


#: x86_64 syscall numbers of the calls we trace: the one place they are written down.
SYSCALL_NUMBERS: dict[EventKind, int] = {
    EventKind.MMAP: 9,
    EventKind.MUNMAP: 11,
    EventKind.BRK: 12,
    EventKind.MREMAP: 25,
    EventKind.SHMAT: 30,
    EventKind.SHMDT: 67,
    EventKind.MEMFD_CREATE: 319,
}
SYSCALL_KINDS: dict[int, EventKind] = {n: k for k, n in SYSCALL_NUMBERS.items()}

# mmap flags and prot bits we interpret (linux/mman.h, x86_64).
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4
#: madvise: its number (not an EventKind: only the fault source follows it) and the advice values
#: that give pages back.
NR_MADVISE = 28
MADV_GIVE_BACK = {"MADV_DONTNEED": 4, "MADV_FREE": 8, "MADV_REMOVE": 9, "MADV_DONTNEED_LOCKED": 24}


@dataclass(frozen=True, slots=True)
class Frame:
    """One return address, resolved as far as we could.

    An interpreted (Python) frame has address 0: module is its source file, offset its line."""

    address: int
    module: str | None = None  # path of the object mapping `address`, as the target sees it
    symbol: str | None = None  # nearest preceding symbol in that object
    offset: int = 0  # from the symbol, or from the module's load base without one

    def __str__(self) -> str:
        if not self.address and self.symbol and self.module:
            return f"{self.symbol} ({_basename(self.module)}:{self.offset})"
        if self.symbol:
            where = f"{self.symbol}+{self.offset:#x}"
        elif self.module:
            where = f"+{self.offset:#x}"
        else:
            return f"{self.address:#x}"
        return f"{_basename(self.module)}!{where}" if self.module else where

    @property
    def library(self) -> str:
        return _basename(self.module) if self.module else "?"

    def to_record(self) -> list:
        return [self.address, self.module, self.symbol, self.offset]

    @classmethod
    def from_record(cls, r: list) -> Frame:
        return cls(r[0], r[1], r[2], r[3])


@dataclass(frozen=True, slots=True)
class Stack:
    """Innermost frame first. ``partial`` says the unwinder stopped before the bottom."""

    frames: tuple[Frame, ...] = ()
    partial: bool = True
    source: str = ""  # how it was obtained: "bpf", "bpf+ret", "dwarf", "gdb", ...

    def to_record(self) -> dict:
        return {
            "frames": [f.to_record() for f in self.frames],
            "partial": self.partial,
            "source": self.source,
        }

    @classmethod
    def from_record(cls, r: dict | None) -> Stack | None:
        if r is None:
            return None
        return cls(tuple(Frame.from_record(f) for f in r["frames"]), r["partial"], r.get("source", ""))

    def __str__(self) -> str:
        text = " <- ".join(str(f) for f in self.frames)
        return text + (" <- ..." if self.partial else "")


@dataclass(frozen=True, slots=True)
class MmapEvent:
    """One memory syscall of the target, entry arguments and return value together.

    Field use by kind:
      mmap       addr (hint), length, prot, flags, fd, ret = mapped address (or -errno)
      munmap     addr, length, ret = 0 or -errno
      mremap     addr = old address, length = old length, new_length, flags, ret = new address
      brk        addr = requested break, ret = the new break
      shmat      fd = shmid, addr (hint), flags = shmflg, ret = attached address; length from the segment
      shmdt      addr
      memfd_create  ret = the new fd
    """

    ts: float
    pid: int
    tid: int
    kind: EventKind
    addr: int = 0
    length: int = 0
    prot: int = 0
    flags: int = 0
    fd: int = -1
    ret: int = 0
    new_length: int = 0
    stack: Stack | None = None
    caller: Frame | None = None  # the first frame past the libc wrapper: who asked for the memory
    comm: str = ""
    path: int = 0  # BCC: the kernel's hash of the frames past the caller (which path made it)

    @property
    def failed(self) -> bool:
        return -4096 < self.ret < 0

    def to_record(self) -> dict:
        r = {
            "ts": self.ts,
            "pid": self.pid,
            "tid": self.tid,
            "kind": self.kind.value,
            "addr": self.addr,
            "length": self.length,
            "ret": self.ret,
        }
        for name in ("prot", "flags", "new_length"):
            if getattr(self, name):
                r[name] = getattr(self, name)
        if self.fd != -1:
            r["fd"] = self.fd
        if self.stack is not None:
            r["stack"] = self.stack.to_record()
        if self.caller is not None:
            r["caller"] = self.caller.to_record()
        if self.comm:
            r["comm"] = self.comm
        if self.path:
            r["path"] = self.path
        return r

    @classmethod
    def from_record(cls, r: dict) -> MmapEvent:
        return cls(
            r["ts"],
            r["pid"],
            r["tid"],
            EventKind(r["kind"]),
            r.get("addr", 0),
            r.get("length", 0),
            r.get("prot", 0),
            r.get("flags", 0),
            r.get("fd", -1),
            r.get("ret", 0),
            r.get("new_length", 0),
            Stack.from_record(r.get("stack")),
            Frame.from_record(r["caller"]) if r.get("caller") else None,
            r.get("comm", ""),
            r.get("path", 0),
        )


@dataclass(frozen=True)
class Outstanding:
    """One traced mapping still held at the end of the window, its caller and stack resolved:
    what the correlator joins with the regions that grew."""

    pid: int
    start: int
    length: int
    caller: Frame | None
    stack: Stack | None = None
    ts: float = 0.0


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]
