"""Addresses of a traced process -> module + symbol + offset, and the CFI of the module.

A process's file mappings come from /proc/PID/maps; each module is read through
/proc/PID/map_files (or /proc/PID/root + path), so a process in a container or one whose library
was replaced on disk resolves against the very file it mapped. Module data (symbol tables read
with numpy, CFI, build-id) is cached by build-id, so a library shared by a process tree is read once.
"""

from __future__ import annotations

import bisect
import mmap
import os
import shutil
import subprocess
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from leakhunt.proc.target import PROC
from leakhunt.trace.cfi import CallFrameInfo, FrameRule
from leakhunt.trace.events import Frame

_SYM_DTYPE = np.dtype(
    [("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"), ("value", "<u8"), ("size", "<u8")]
)
_STT_FUNC, _STT_GNU_IFUNC = 2, 10
_STB_GLOBAL = 1
#: How often a process's maps may be re-read to resolve an address we have not seen mapped.
REFRESH_MIN_S = 0.2
#: Unwinding rules kept per module (return addresses repeat: the same call sites over and over).
RULE_CACHE = 65536
_MISSING = object()


@dataclass(frozen=True, slots=True)
class FileMapping:
    """One file-backed line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str
    range_text: str  # "start-end" exactly as maps prints it: the name in map_files/

    @property
    def executable(self) -> bool:
        return "x" in self.perms


def parse_maps(text: bytes) -> list[FileMapping]:
    """File-backed mappings of a maps file, in address order."""
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith(b"/"):
            continue
        rng = parts[0].decode()
        lo, _, hi = rng.partition("-")
        out.append(
            FileMapping(
                int(lo, 16),
                int(hi, 16),
                parts[1].decode(),
                int(parts[2], 16),
                int(parts[4]),
                parts[5].decode(errors="replace"),
                rng,
            )
        )
    return out


class Module:
    """The ELF data of one file: load segments, symbols (symtab, dynsym, or a debug file), CFI."""

    def __init__(self, path: str, data: mmap.mmap, elf: ELFFile, debug: tuple | None = None) -> None:
        self.path = path
        self._data = data
        self._elf = elf
        self._debug = debug  # (mmap, ELFFile) of a separate debug file, when one was found
        self.segments = [
            (s["p_offset"], s["p_vaddr"], s["p_filesz"])
            for s in elf.iter_segments()
            if s["p_type"] == "PT_LOAD"
        ]
        self._lock = threading.Lock()
        self._rules: dict[int, FrameRule | None] = {}

    @staticmethod
    def build_id(elf: ELFFile) -> str | None:
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_NOTE":
                continue
            for note in seg.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return note["n_desc"]
        return None

    def vaddr(self, file_offset: int) -> int | None:
        """The ELF virtual address of a file offset (what symbols and CFI are written in)."""
        return self._translate(file_offset, 0, 1)

    def file_offset(self, vaddr: int) -> int | None:
        """The inverse of vaddr(): where an ELF virtual address lies in the file."""
        return self._translate(vaddr, 1, 0)

    def _translate(self, x: int, src: int, dst: int) -> int | None:
        for segment in self.segments:  # (file offset, vaddr, size in the file)
            if segment[src] <= x < segment[src] + segment[2]:
                return segment[dst] + x - segment[src]
        return None

    # -- symbols -------------------------------------------------------------------------------

    @cached_property
    def _symbols(self) -> tuple[list[int], np.ndarray, np.ndarray, list]:
        tables = []
        sources = [(self._elf, self._data)]
        if self._debug is not None:
            sources.insert(0, (self._debug[1], self._debug[0]))
        for elf, data in sources:
            for name in (".symtab", ".dynsym"):
                sec = elf.get_section_by_name(name)
                if sec is None or sec["sh_entsize"] != _SYM_DTYPE.itemsize or sec["sh_type"] == "SHT_NOBITS":
                    continue
                strtab = elf.get_section(sec["sh_link"])
                syms = np.frombuffer(
                    data,
                    dtype=_SYM_DTYPE,
                    count=sec["sh_size"] // _SYM_DTYPE.itemsize,
                    offset=sec["sh_offset"],
                )
                kind = syms["info"] & 0xF
                keep = ((kind == _STT_FUNC) | (kind == _STT_GNU_IFUNC)) & (syms["value"] != 0)
                tables.append((syms[keep], data, strtab["sh_offset"]))
        if not tables:
            return [], np.zeros(0, np.uint64), np.zeros(0, np.uint64), []
        values = np.concatenate([t[0]["value"] for t in tables])
        sizes = np.concatenate([t[0]["size"] for t in tables])
        # Prefer global symbols, then shorter names, among aliases at one address (mmap, mmap64...).
        glob = np.concatenate([(t[0]["info"] >> 4) == _STB_GLOBAL for t in tables])
        names = [(t[1], t[2] + int(n)) for t in tables for n in t[0]["name"]]
        order = np.lexsort((~glob, values))
        values, sizes = values[order], sizes[order]
        names = [names[i] for i in order]
        return values.tolist(), values, sizes, names

    def _name(self, ref) -> str:
        data, off = ref
        end = data.find(b"\0", off)
        # .symtab names carry symbol versions ("__libc_start_main@@GLIBC_2.34"): not part of the name.
        return data[off:end].split(b"@", 1)[0].decode(errors="replace")

    def function(self, name: str) -> tuple[int, int] | None:
        """(ELF virtual address, size) of the function called ``name`` (any alias), or None."""
        values_list, _, sizes, names = self._symbols
        for i, ref in enumerate(names):
            if self._name(ref) == name:
                return values_list[i], int(sizes[i])
        return None

    def symbolize(self, vaddr: int) -> tuple[str, int] | None:
        """(symbol, offset) of the function containing ``vaddr``, or None."""
        values_list, values, sizes, names = self._symbols
        i = bisect.bisect_right(values_list, vaddr) - 1
        if i < 0:
            return None
        start = values_list[i]
        # The first of the aliases at this address (the preferred one, by the sort above).
        j = bisect.bisect_left(values_list, start)
        size = int(sizes[j : i + 1].max())
        if size and vaddr >= start + size:
            return None
        return demangle(self._name(names[j])), vaddr - start

    # -- CFI -----------------------------------------------------------------------------------

    @cached_property
    def cfi(self) -> CallFrameInfo | None:
        sec = self._elf.get_section_by_name(".eh_frame")
        if sec is None or sec["sh_type"] == "SHT_NOBITS":
            return None
        hdr = self._elf.get_section_by_name(".eh_frame_hdr")
        data = memoryview(self._data)[sec["sh_offset"] : sec["sh_offset"] + sec["sh_size"]]
        hdr_bytes = (
            self._data[hdr["sh_offset"] : hdr["sh_offset"] + hdr["sh_size"]] if hdr is not None else None
        )
        return CallFrameInfo(data, sec["sh_addr"], hdr_bytes, hdr["sh_addr"] if hdr is not None else 0)

    def rule_at(self, vaddr: int) -> FrameRule | None:
        hit = self._rules.get(vaddr, _MISSING)
        if hit is not _MISSING:
            return hit
        with self._lock:
            cfi = self.cfi
        rule = None
        if cfi is not None:
            try:
                rule = cfi.rule_at(vaddr)
            except (ValueError, IndexError):
                rule = None
        if len(self._rules) >= RULE_CACHE:
            self._rules.clear()  # a hot set of return addresses refills it at once
        self._rules[vaddr] = rule
        return rule

    def read(self, vaddr: int, size: int) -> bytes | None:
        """File bytes at an ELF virtual address (to compare with what the process has in memory)."""
        for off, base, filesz in self.segments:
            if base <= vaddr and vaddr + size <= base + filesz:
                return bytes(self._data[off + vaddr - base : off + vaddr - base + size])
        return None


class ModuleCache:
    """Modules by identity (build-id, else device/inode/size/mtime), least recently used first out."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._modules: OrderedDict[object, Module | None] = OrderedDict()
        self._lock = threading.Lock()

    def open(
        self, candidates: list[str], root: Path, display_path: str, fallback: tuple[str, int] | None = None
    ) -> Module | None:
        """The first of ``candidates`` that opens, else ``fallback`` (path, inode) if it is the very
        file mapped (same inode): our own view of a path may hold another file than the target's."""
        tries = [(path, None) for path in candidates] + ([fallback] if fallback else [])
        for path, inode in tries:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                if inode is None or os.fstat(fd).st_ino == inode:
                    return self._load(fd, root, display_path)
            finally:
                os.close(fd)
        return None

    def _load(self, fd: int, root: Path, display_path: str) -> Module | None:
        st = os.fstat(fd)
        if st.st_size == 0:
            return None
        try:
            data = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            elf = ELFFile(_MmapFile(data))
            build_id = Module.build_id(elf)
        except (ELFError, ValueError, OSError):
            return None
        key = build_id or (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._modules:
                self._modules.move_to_end(key)
                return self._modules[key]
        module = Module(display_path, data, elf, _debug_file(build_id, root))
        with self._lock:
            self._modules[key] = module
            while len(self._modules) > self.capacity:
                self._modules.popitem(last=False)
        return module


class _MmapFile:
    """A read-only file object over an mmap, for pyelftools (which seeks and reads)."""

    def __init__(self, data: mmap.mmap) -> None:
        self._data = data
        self._pos = 0

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else (self._pos + pos if whence == 1 else len(self._data) + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n is None or n < 0 else min(len(self._data), self._pos + n)
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk


def _debug_file(build_id: str | None, root: Path) -> tuple | None:
    """A separate debug file by build-id (Debian's *-dbgsym packages), in the target's root first."""
    if not build_id or len(build_id) < 3:
        return None
    rel = f"usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
    for base in (root, Path("/")):
        try:
            fd = os.open(base / rel, os.O_RDONLY)
        except OSError:
            continue
        try:
            data = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            return data, ELFFile(_MmapFile(data))
        except (ELFError, ValueError, OSError):
            continue
        finally:
            os.close(fd)
    return None


class ProcessModules:
    """The modules one process has mapped, refreshed from /proc/PID/maps when an address misses."""

    def __init__(self, pid: int, cache: ModuleCache) -> None:
        self.pid = pid
        self.cache = cache
        self._mappings: list[FileMapping] = []
        self._starts: list[int] = []
        self._modules: dict[tuple[int, str], Module | None] = {}
        self._refreshed = 0.0
        self.refresh()

    def refresh(self) -> bool:
        """Re-read the maps; False when the process is gone (the last maps stay usable)."""
        self._refreshed = time.monotonic()
        try:
            text = (PROC / str(self.pid) / "maps").read_bytes()
        except OSError:
            return False
        self._mappings = parse_maps(text)
        self._starts = [m.start for m in self._mappings]
        return True

    @property
    def mappings(self) -> list[FileMapping]:
        return list(self._mappings)

    def mapping(self, address: int) -> FileMapping | None:
        m = self._find(address)
        if m is None and time.monotonic() - self._refreshed >= REFRESH_MIN_S:
            self.refresh()
            m = self._find(address)
        return m

    def _find(self, address: int) -> FileMapping | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and self._mappings[i].start <= address < self._mappings[i].end:
            return self._mappings[i]
        return None

    def module(self, m: FileMapping) -> Module | None:
        key = (m.inode, m.path)
        if key not in self._modules:
            root = PROC / str(self.pid) / "root"
            candidates = [str(PROC / str(self.pid) / "map_files" / m.range_text), str(root) + m.path]
            # Our own view of m.path is the last resort (a root we may not enter): in a container it
            # may be another build of the library (the host's libc), whose symbols name wrong code.
            self._modules[key] = self.cache.open(candidates, root, m.path, fallback=(m.path, m.inode))
        return self._modules[key]

    def locate(self, address: int) -> tuple[FileMapping, Module, int] | None:
        """(mapping, module, ELF virtual address) of a code address, or None."""
        m = self.mapping(address)
        if m is None:
            return None
        module = self.module(m)
        if module is None:
            return None
        vaddr = module.vaddr(address - m.start + m.offset)
        if vaddr is None:
            return None
        return m, module, vaddr

    def frame(self, address: int, is_return: bool = True) -> Frame:
        """Resolve one address. A return address is looked up at address-1: the call instruction,
        which is what belongs to the caller when a call is the last instruction of a function."""
        probe = address - 1 if is_return and address else address
        where = self.locate(probe)
        if where is None:
            m = self.mapping(address)
            return Frame(address, m.path if m else None, None, 0)
        m, module, vaddr = where
        sym = module.symbolize(vaddr)
        if sym is None:
            return Frame(address, m.path, None, vaddr + address - probe)
        name, off = sym
        return Frame(address, m.path, name, off + address - probe)

    def rule_at(self, address: int, is_return: bool) -> FrameRule | None:
        where = self.locate(address - 1 if is_return else address)
        if where is None:
            return None
        return where[1].rule_at(where[2])


_demangled: dict[str, str] = {}


def demangle(name: str) -> str:
    """C++ names through c++filt (cached; the raw name when binutils is missing)."""
    if not name.startswith("_Z"):
        return name
    hit = _demangled.get(name)
    if hit is not None:
        return hit
    result = name
    if shutil.which("c++filt"):
        try:
            result = (
                subprocess.run(["c++filt", name], capture_output=True, text=True, timeout=5).stdout.strip()
                or name
            )
        except (OSError, subprocess.SubprocessError):
            pass
    _demangled[name] = result
    return result
