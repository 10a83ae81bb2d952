"""The last line of defence when gdb dies or hangs while its breakpoints are in the target.

A software breakpoint is an int3 byte written over the target's code. gdb removes them when it
detaches; if gdb is killed instead, the kernel detaches the target with the int3 bytes still in
place and the next thread to run over one dies of SIGTRAP: that is how a manual gdb session
crashes a server. The guard remembers every address where gdb may have written one (our
breakpoints, the return addresses of calls in flight, gdb's displaced-stepping scratch pad at the
entry point) with the bytes that were there, and puts back the ones that differ.

"The bytes that were there" are read from the target's memory before gdb writes, not from the
file: libucm patches libc's mmap/munmap with a jump into itself, and putting the file's first byte
back under that jump would break the instruction. Only when memory already shows an int3 (a
return address gdb armed before we looked) do we take the file's byte.
"""

from __future__ import annotations

import struct

from leakhunt.errors import AccessDenied, TargetGone
from leakhunt.gdb.memory import AddressSpace
from leakhunt.proc.target import proc_read, read_memory, write_memory

INT3 = 0xCC
AT_ENTRY = 9
#: gdb copies the instruction being stepped over to the executable's entry point (amd64: up to
#: 16 bytes, plus the jump back); restoring a little more is harmless, _start runs only once.
SCRATCH_BYTES = 32


class BreakpointGuard:
    def __init__(self, space: AddressSpace) -> None:
        self.space = space
        self._original: dict[int, bytes] = {}

    def protect(self, address: int, length: int = 1) -> None:
        if address in self._original:
            return
        data = read_memory(self.space.target.pid, address, length)
        if data is None or len(data) != length or INT3 in data:
            data = self.space.file_bytes(address, length)
        if data is not None:
            self._original[address] = data

    def protect_scratch_pad(self) -> None:
        entry = _auxv(self.space.target.pid).get(AT_ENTRY)
        if entry:
            self.protect(entry, SCRATCH_BYTES)

    @property
    def addresses(self) -> int:
        return len(self._original)

    def restore(self) -> int:
        """Write back every remembered range whose bytes changed; return how many were restored.

        A single byte is restored only where it is an int3 now (if the library was unloaded and
        something else mapped there, we must not write into it)."""
        pid = self.space.target.pid
        restored = 0
        for address, original in self._original.items():
            current = read_memory(pid, address, len(original))
            if current is None or current == original:
                continue
            if len(original) == 1 and current[0] != INT3:
                continue
            if write_memory(pid, address, original):
                restored += 1
        return restored


def _auxv(pid: int) -> dict[int, int]:
    try:
        data = proc_read(pid, "auxv")
    except (TargetGone, AccessDenied):
        return {}
    pairs = struct.iter_unpack("<QQ", data[: len(data) // 16 * 16])
    return {key: value for key, value in pairs if key}
