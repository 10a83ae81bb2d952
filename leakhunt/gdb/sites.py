"""Where the gdb backend breaks and what each breakpoint means: glibc's ``syscall()`` with a
condition on the syscall number, and the libc wrappers (``mmap``/``mmap64``, ``munmap``...).

Addresses are resolved from libc's own ELF symbol table (as the target mapped it) rather than by
gdb's ``break NAME``: gdb skips a function's "prologue" when it has line info, and in ``syscall``
the second instruction already moves the syscall number out of %rdi; a name can also resolve in
several objects (an interposing hook library defines its own ``mmap``), which would double count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from leakhunt.errors import BackendUnavailable
from leakhunt.gdb.memory import AddressSpace, Mapping
from leakhunt.trace.events import SYSCALL_NUMBERS, EventKind

#: Argument registers (x86-64 SysV). syscall(nr, a1, ...) shifts the syscall's arguments by one.
WRAPPER_REGISTERS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
SYSCALL_REGISTERS = ("rsi", "rdx", "rcx", "r8", "r9")

#: The syscall's arguments in order, named as MmapEvent fields ("_" = not kept).
ARGUMENTS: dict[EventKind, tuple[str, ...]] = {
    EventKind.MMAP: ("addr", "length", "prot", "flags", "fd"),
    EventKind.MUNMAP: ("addr", "length"),
    EventKind.MREMAP: ("addr", "length", "new_length", "flags"),
    EventKind.BRK: ("addr",),
    EventKind.SHMAT: ("fd", "addr", "flags"),
    EventKind.SHMDT: ("addr",),
    EventKind.MEMFD_CREATE: ("_", "flags"),
}

#: glibc's exported wrappers. brk has none worth breaking on: the wrapper returns 0, not the break.
WRAPPERS: dict[EventKind, tuple[str, ...]] = {
    EventKind.MMAP: ("mmap", "mmap64"),
    EventKind.MUNMAP: ("munmap",),
    EventKind.MREMAP: ("mremap",),
    EventKind.SHMAT: ("shmat",),
    EventKind.SHMDT: ("shmdt",),
    EventKind.MEMFD_CREATE: ("memfd_create",),
}

#: Arguments the --min-length threshold applies to (any of them large enough keeps the call).
LENGTH_ARGUMENTS: dict[EventKind, tuple[str, ...]] = {
    EventKind.MMAP: ("length",),
    EventKind.MUNMAP: ("length",),
    EventKind.MREMAP: ("length", "new_length"),
}

VIA_SYSCALL = "syscall"
VIA_WRAPPER = "wrapper"

_LIBC = re.compile(r"^libc(\.so\.\d+|-[\d.]+\.so)$")


@dataclass(frozen=True)
class Site:
    """One breakpoint: a kind of call, reached through ``syscall()`` or a wrapper, at an address."""

    kind: EventKind
    via: str
    symbol: str
    address: int
    condition: str | None

    @property
    def registers(self) -> tuple[str, ...]:
        """The registers holding this call's arguments, in ARGUMENTS order."""
        regs = SYSCALL_REGISTERS if self.via == VIA_SYSCALL else WRAPPER_REGISTERS
        return regs[: len(ARGUMENTS[self.kind])]

    @property
    def location(self) -> str:
        return f"*{self.address:#x}"

    def describe(self) -> str:
        return f"{self.symbol}" + (f" if {self.condition}" if self.condition else "")


def condition_for(kind: EventKind, via: str, min_length: int) -> str | None:
    """The gdb condition of a site: the syscall number, and the length threshold if any."""
    parts = []
    registers = SYSCALL_REGISTERS if via == VIA_SYSCALL else WRAPPER_REGISTERS
    if via == VIA_SYSCALL:
        parts.append(f"$rdi == {SYSCALL_NUMBERS[kind]}")
    if min_length > 0 and kind in LENGTH_ARGUMENTS:
        names = ARGUMENTS[kind]
        tests = [
            f"(unsigned long)${registers[names.index(a)]} >= {min_length}" for a in LENGTH_ARGUMENTS[kind]
        ]
        parts.append(tests[0] if len(tests) == 1 else "(" + " || ".join(tests) + ")")
    return " && ".join(parts) or None


def plan_sites(
    space: AddressSpace,
    kinds: frozenset[EventKind],
    min_length: int = 0,
    vias: tuple[str, ...] = (VIA_SYSCALL, VIA_WRAPPER),
) -> list[Site]:
    """Breakpoints for ``kinds`` in the target's libc (or a static executable's own symbols)."""
    image, symbols = _libc_image(space)
    sites: list[Site] = []
    seen: set[tuple[EventKind, int]] = set()
    for kind in sorted(kinds & ARGUMENTS.keys(), key=lambda k: SYSCALL_NUMBERS[k]):
        names = ((VIA_SYSCALL, "syscall"),) if VIA_SYSCALL in vias else ()
        if VIA_WRAPPER in vias:
            names += tuple((VIA_WRAPPER, n) for n in WRAPPERS.get(kind, ()))
        for via, name in names:
            address = symbols.get(name)
            if address is None or (kind, address) in seen:
                continue  # mmap and mmap64 are one function in glibc: break once
            seen.add((kind, address))
            sites.append(Site(kind, via, name, address, condition_for(kind, via, min_length)))
    if not sites:
        raise BackendUnavailable("gdb", f"no syscall()/mmap symbols found in {image} of the target", "")
    return sites


def _libc_image(space: AddressSpace) -> tuple[str, dict[str, int]]:
    """(path, {symbol: runtime address}) of the target's libc, or of its executable if static."""
    paths = [m.path for m in space.mappings if m.is_file]
    libc = next((p for p in paths if _LIBC.match(PurePosixPath(p).name)), None)
    image = libc or (paths[0] if paths else "")
    if not image:
        raise BackendUnavailable("gdb", "the target has no mapped executable or libc", "")
    wanted = {"syscall"} | {n for names in WRAPPERS.values() for n in names}
    return image, resolve_symbols(space, image, wanted)


def resolve_symbols(space: AddressSpace, image: str, names: set[str]) -> dict[str, int]:
    """Runtime addresses of function symbols of the object mapped from ``image``."""
    mappings = [m for m in space.mappings if m.path == image]
    try:
        with open(space.map_file(mappings[0]), "rb") as f:
            return _symbols_in(ELFFile(f), mappings, names)
    except OSError:
        pass
    try:
        with open(space.target_path(image), "rb") as f:
            return _symbols_in(ELFFile(f), mappings, names)
    except (OSError, ELFError) as e:
        raise BackendUnavailable("gdb", f"cannot read {image} of the target: {e}", "") from None


def _symbols_in(elf: ELFFile, mappings: list[Mapping], names: set[str]) -> dict[str, int]:
    loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
    found: dict[str, int] = {}
    for section_name in (".dynsym", ".symtab"):
        section = elf.get_section_by_name(section_name)
        if section is None:
            continue
        for name in names - found.keys():
            for sym in section.get_symbol_by_name(name) or ():
                if (
                    sym["st_info"]["type"] == "STT_FUNC"
                    and sym["st_value"]
                    and sym["st_shndx"] != "SHN_UNDEF"
                ):
                    address = _runtime_address(sym["st_value"], loads, mappings)
                    if address is not None:
                        found[name] = address
                        break
    return found


def _runtime_address(vaddr: int, loads: list, mappings: list[Mapping]) -> int | None:
    """Link-time address -> file offset (through its PT_LOAD) -> the code mapping that holds it.
    Only executable mappings: a process that maps its libc file to read it (a symbolizer, an ELF
    parser) has a second, read-only mapping of the same offsets, where a breakpoint never fires."""
    for seg in loads:
        if seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"]:
            file_offset = vaddr - seg["p_vaddr"] + seg["p_offset"]
            for m in (m for m in mappings if m.executable):
                if m.offset <= file_offset < m.offset + (m.end - m.start):
                    return m.start + file_offset - m.offset
    return None
