"""Detect libc functions patched in memory (UCX libucm's "bistro" hooks and their kind).

libucm rewrites the first bytes of libc's mmap, munmap, mremap, brk... with a jump into itself.
A uprobe (or a breakpoint tool that assumes the file's bytes) on such a function kills the
target with SIGILL, and the patch is also the fingerprint of the libucm leak. We compare the
function's bytes in the target (/proc/PID/mem) with the bytes of the file it was mapped from.
leakhunt's BPF backends use syscall tracepoints only and never probe user code; this tells the
user (and any tool that does place uprobes or breakpoints) what is patched and by whom.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from leakhunt.proc.target import read_memory
from leakhunt.trace.events import Frame
from leakhunt.trace.unwind import CallerResolver, libc_functions

#: Functions memory hooks patch (libucm's bistro list, plus the syscall wrapper itself).
HOOKABLE = ("mmap", "mmap64", "munmap", "mremap", "brk", "sbrk", "shmat", "shmdt", "madvise", "syscall")
COMPARE_BYTES = 16


@dataclass(frozen=True)
class PatchedFunction:
    module: str
    symbol: str
    address: int
    file_bytes: bytes
    memory_bytes: bytes
    jumps_to: Frame | None  # where the patch leads, when it is a recognisable jump

    def describe(self) -> str:
        dest = self.jumps_to
        where = ""
        if dest is not None:
            where = f" -> {dest.library}!{dest.symbol}" if dest.symbol and not dest.offset else f" -> {dest}"
        return f"{self.module.rsplit('/', 1)[-1]}!{self.symbol}{where}"


def jump_target(code: bytes, address: int) -> int | None:
    """The destination of the jump a hook writes: jmp rel32, jmp [rip+x], movabs rax/r11 + jmp."""
    if code[:1] == b"\xe9":
        return (address + 5 + struct.unpack_from("<i", code, 1)[0]) & 0xFFFFFFFFFFFFFFFF
    if code[:2] == b"\xff\x25":
        return None  # through memory: the pointer is elsewhere
    if code[:2] in (b"\x48\xb8", b"\x49\xbb") and len(code) >= 10:
        return struct.unpack_from("<Q", code, 2)[0]
    return None


def find_patched(
    pid: int, resolver: CallerResolver | None = None, names: tuple[str, ...] = HOOKABLE
) -> list[PatchedFunction]:
    """Functions of the target's libc (and loader) whose code differs from the file."""
    pm = (resolver or CallerResolver()).modules(pid)
    out = []
    for fn in libc_functions(pm, names):
        want = fn.module.read(fn.vaddr, COMPARE_BYTES)
        got = read_memory(pid, fn.address, COMPARE_BYTES)
        if want is None or got is None or got == want:
            continue
        dest = jump_target(got, fn.address)
        out.append(
            PatchedFunction(
                fn.mapping.path,
                fn.name,
                fn.address,
                want,
                got,
                pm.frame(dest, is_return=False) if dest else None,
            )
        )
    return out


def patched_note(patched: list[PatchedFunction]) -> str | None:
    """One line for TraceStats.notes, or None when nothing is patched."""
    if not patched:
        return None
    by_dest: dict[str, list[str]] = {}
    for p in patched:
        dest = p.jumps_to.library if p.jumps_to is not None else "somewhere unknown"
        by_dest.setdefault(dest, []).append(p.symbol)
    libc = patched[0].module.rsplit("/", 1)[-1]
    hooks = "; ".join(f"{', '.join(names)} jump into {dest}" for dest, names in by_dest.items())
    return (
        f"{libc} is patched in memory (memory hooks, like UCX libucm's): {hooks}. leakhunt places no "
        "uprobes (one on patched code kills the target with SIGILL); its tracepoints see the syscalls "
        "the hooks make"
    )
