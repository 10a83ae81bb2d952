"""Who called the syscall wrapper: the return address from the copied top of the user stack, and
deeper frames by DWARF CFI unwinding of that copy.

At a syscall the wrapper (glibc's ``syscall``, ``mmap64``, ``munmap``...) is a leaf sitting at the
``syscall`` instruction, and the CFI of libc tells where the CFA is at that ip, hence where the
return address into the calling library is. The BPF side reads the stack word at that slot (or
copies a window of the stack); everything here runs in user space on those bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from leakhunt.trace.cfi import RBP, RSP
from leakhunt.trace.events import Frame, Stack
from leakhunt.trace.symbols import FileMapping, Module, ModuleCache, ProcessModules

#: Modules whose functions are syscall wrappers rather than callers: the C library and loader.
WRAPPER_MODULES = ("libc.so", "libc-", "ld-linux", "ld-musl", "libc.musl", "libpthread.so")


def is_wrapper_module(path: str | None) -> bool:
    name = (path or "").rsplit("/", 1)[-1]
    return name.startswith(WRAPPER_MODULES)


@dataclass(frozen=True, slots=True)
class LibcFunction:
    """A function of the C library (or loader) as one process has it mapped."""

    name: str
    mapping: FileMapping
    module: Module
    vaddr: int  # in the ELF file
    size: int
    address: int  # in the process


def libc_functions(pm: ProcessModules, names: tuple[str, ...]) -> Iterator[LibcFunction]:
    """The named functions of every C library and loader the process maps (aliases once)."""
    done: set[str] = set()
    addresses: set[int] = set()
    for m in pm.mappings:
        if not m.executable or not is_wrapper_module(m.path) or m.path in done:
            continue
        done.add(m.path)
        module = pm.module(m)
        if module is None:
            continue
        for name in names:
            fn = module.function(name)
            foff = module.file_offset(fn[0]) if fn else None
            if foff is None:
                continue
            address = m.start - m.offset + foff
            if address not in addresses:
                addresses.add(address)
                yield LibcFunction(name, m, module, fn[0], fn[1], address)


@dataclass(frozen=True, slots=True)
class UserContext:
    """User registers at the syscall and a copy of the stack from ``sp`` upwards."""

    ip: int
    sp: int
    bp: int
    stack: bytes = b""

    def word(self, address: int) -> int | None:
        off = address - self.sp
        if off < 0 or off + 8 > len(self.stack):
            return None
        return struct.unpack_from("<Q", self.stack, off)[0]


@dataclass(frozen=True, slots=True)
class Site:
    """Where a syscall came from: the wrapper frame (the ip) and the caller past it."""

    wrapper: Frame | None
    caller: Frame

    @property
    def key(self) -> tuple[str, str]:
        return self.caller.library, self.caller.symbol or f"+{self.caller.offset:#x}"


class CallerResolver:
    """Resolves sites and stacks for any process of a traced tree (one ProcessModules per pid)."""

    def __init__(self, cache: ModuleCache | None = None) -> None:
        self.cache = cache or ModuleCache()
        self._procs: dict[int, ProcessModules] = {}
        self._sites: dict[tuple[int, int, int], Site] = {}
        self._slots: dict[tuple[int, int], int | None] = {}

    def modules(self, pid: int) -> ProcessModules:
        pm = self._procs.get(pid)
        if pm is None:
            pm = self._procs[pid] = ProcessModules(pid, self.cache)
        return pm

    def forget(self, pid: int) -> None:
        """After exec the address space is new: drop what we knew about it."""
        self._procs.pop(pid, None)
        for cache in (self._sites, self._slots):
            for key in [k for k in cache if k[0] == pid]:
                del cache[key]

    def return_slot(self, pid: int, ip: int) -> int | None:
        """Offset from sp of the wrapper's return address at ``ip`` (None: not rsp-based CFA)."""
        key = (pid, ip)
        if key not in self._slots:
            rule = self.modules(pid).rule_at(ip, is_return=False)
            self._slots[key] = rule.return_slot() if rule is not None else None
        return self._slots[key]

    def site(self, pid: int, ip: int, ra: int | None) -> Site:
        """The site of a syscall at ``ip`` whose wrapper returns to ``ra`` (the kernel read it at
        the CFI slot). A syscall instruction outside libc is its own caller (inline syscall)."""
        key = (pid, ip, ra or 0)
        hit = self._sites.get(key)
        if hit is not None:
            return hit
        pm = self.modules(pid)
        here = pm.frame(ip, is_return=False)
        if is_wrapper_module(here.module) and ra:
            site = Site(here, pm.frame(ra, is_return=True))
        else:
            site = Site(None, here)
        self._sites[key] = site
        return site

    def unwind(self, pid: int, ctx: UserContext, max_depth: int = 32) -> Stack:
        """Frames from the syscall ip outwards through the copied stack, innermost first.
        ``partial`` is False only when the CFI says the outermost frame was reached."""
        pm = self.modules(pid)
        frames = [pm.frame(ctx.ip, is_return=False)]
        pc, sp, bp = ctx.ip, ctx.sp, ctx.bp
        partial = True
        for depth in range(max_depth):
            rule = pm.rule_at(pc, is_return=depth > 0)
            if rule is None or rule.cfa_reg not in (RSP, RBP):
                break
            base = sp if rule.cfa_reg == RSP else bp
            if base is None:
                break
            cfa = base + rule.cfa_offset
            ra_rule = rule.return_address
            if ra_rule.kind == "undefined":
                partial = False  # the CFI marks the outermost frame (_start, clone)
                break
            if ra_rule.kind != "offset":
                break
            ra = ctx.word(cfa + ra_rule.value)
            if ra is None:
                break  # past the copied window
            bp_rule = rule.registers.get(RBP)
            if bp_rule is not None and bp_rule.kind == "offset":
                bp = ctx.word(cfa + bp_rule.value)
            if ra == 0:
                partial = False
                break
            frames.append(pm.frame(ra, is_return=True))
            pc, sp = ra, cfa
        return Stack(tuple(frames), partial, "bpf+dwarf")

    def path_rules(self, pid: int, ctx: UserContext, max_depth: int = 8) -> list[tuple[int, int, int]]:
        """How to step out of each frame past the wrapper's in a copied stack, for the BCC
        probe's path keys: (return address, CFA offset from sp, return-address offset from the
        CFA), innermost first, as long as each frame's CFA is rsp-based (the probe knows no other
        registers). The probe starts from the wrapper's own CFA, which the return-address slot
        already gives it."""
        pm = self.modules(pid)
        rule = pm.rule_at(ctx.ip, is_return=False)
        if rule is None or rule.return_slot() is None:
            return []
        sp = ctx.sp + rule.cfa_offset
        pc = ctx.word(sp + rule.return_address.value)
        out = []
        while pc and len(out) < max_depth:
            rule = pm.rule_at(pc, is_return=True)
            if rule is None or rule.cfa_reg != RSP or rule.return_address.kind != "offset":
                break
            out.append((pc, rule.cfa_offset, rule.return_address.value))
            sp += rule.cfa_offset
            pc = ctx.word(sp + rule.return_address.value)
        return out

    def stack_for(self, pid: int, site: Site, ctx: UserContext | None, max_depth: int = 32) -> Stack:
        """A stack for a site: DWARF-unwound from a copied stack when we have one, else the
        wrapper and its caller (always partial)."""
        if ctx is not None and ctx.stack:
            stack = self.unwind(pid, ctx, max_depth)
            if len(stack.frames) >= 2:
                return stack
        frames = tuple(f for f in (site.wrapper, site.caller) if f is not None)
        return Stack(frames, True, "bpf+cfi")
