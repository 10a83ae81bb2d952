"""Call-frame information (.eh_frame) of one ELF module: where the return address of a frame is.

glibc has no frame pointers, so the only reliable way past its syscall wrappers is the CFI the
compiler emits for exception handling. We look up one FDE per address through the binary-search
table of ``.eh_frame_hdr`` (a multi-hundred-megabyte library has hundreds of thousands of FDEs:
never parse them all), and run its CFA program up to the address. x86_64 only.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass

import numpy as np

# DWARF register numbers on x86_64.
RBP, RSP, RA = 6, 7, 16

# Pointer encodings (DW_EH_PE_*).
_PE_OMIT = 0xFF
_PE_FORMAT_SIZE = {0x00: 8, 0x02: 2, 0x03: 4, 0x04: 8, 0x0A: 2, 0x0B: 4, 0x0C: 8}
_PE_SIGNED = {0x09, 0x0A, 0x0B, 0x0C}
_PE_PCREL, _PE_DATAREL = 0x10, 0x30


@dataclass(frozen=True, slots=True)
class Rule:
    """How to recover one register in the caller: kind is 'offset' (saved at CFA+n), 'val_offset'
    (the value is CFA+n), 'register' (in register n), 'same', or 'undefined'."""

    kind: str
    value: int = 0


@dataclass(frozen=True, slots=True)
class FrameRule:
    """The unwinding rule at one address: CFA = reg + offset, then each register's rule.
    ``cfa_reg`` is None when the CFA is a DWARF expression (PLT stubs): we do not evaluate those."""

    cfa_reg: int | None
    cfa_offset: int
    registers: dict[int, Rule]

    @property
    def return_address(self) -> Rule:
        return self.registers.get(RA, Rule("undefined"))

    def return_slot(self, sp_value: int | None = None) -> int | None:
        """Offset from the stack pointer where the return address is saved, when the CFA is
        rsp-based (the case of every leaf wrapper); None otherwise."""
        ra = self.return_address
        if self.cfa_reg != RSP or ra.kind != "offset":
            return None
        return self.cfa_offset + ra.value


class _Reader:
    __slots__ = ("data", "pos", "base")

    def __init__(self, data, pos: int, base: int) -> None:
        self.data = data  # the section bytes
        self.pos = pos  # offset in data
        self.base = base  # virtual address of data[0]

    def u8(self) -> int:
        v = self.data[self.pos]
        self.pos += 1
        return v

    def fixed(self, fmt: str, size: int) -> int:
        v = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += size
        return v

    def uleb(self) -> int:
        return self._leb(False)

    def sleb(self) -> int:
        return self._leb(True)

    def _leb(self, signed: bool) -> int:
        result = shift = 0
        while True:
            b = self.data[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return result - (1 << shift) if signed and b & 0x40 else result

    def cstring(self) -> bytes:
        end = bytes(self.data[self.pos : self.pos + 64]).index(b"\0")
        s = bytes(self.data[self.pos : self.pos + end])
        self.pos += end + 1
        return s

    def pointer(self, enc: int, datarel_base: int = 0) -> int:
        here = self.base + self.pos
        fmt = enc & 0x0F
        if fmt == 0x01:
            v = self.uleb()
        elif fmt == 0x09:
            v = self.sleb()
        else:
            size = _PE_FORMAT_SIZE.get(fmt)
            if size is None:
                raise ValueError(f"unsupported pointer encoding {enc:#x}")
            code = {2: "h", 4: "i", 8: "q"}[size]
            v = self.fixed("<" + (code if fmt in _PE_SIGNED else code.upper()), size)
        app = enc & 0x70
        if app == _PE_PCREL:
            v += here
        elif app == _PE_DATAREL:
            v += datarel_base
        return v & 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True, slots=True)
class _Cie:
    code_align: int
    data_align: int
    ra_register: int
    fde_encoding: int
    augmented: bool
    initial: tuple[int, int]  # (start, end) offsets of the initial instructions


class CallFrameInfo:
    """The .eh_frame of one module, indexed by .eh_frame_hdr (or by one linear scan without it).

    ``data`` is the section's bytes, ``vaddr`` its address in the ELF's virtual address space;
    all addresses here are ELF virtual addresses (not load addresses)."""

    def __init__(self, data, vaddr: int, hdr: bytes | None = None, hdr_vaddr: int = 0) -> None:
        self.data = data
        self.vaddr = vaddr
        self._cies: dict[int, _Cie] = {}
        self._starts: np.ndarray
        self._fdes: np.ndarray
        index = _hdr_index(hdr, hdr_vaddr) if hdr else None
        if index is None:
            index = self._scan()
        self._starts, self._fdes = index
        self._starts_list = self._starts.tolist()

    def __len__(self) -> int:
        return len(self._starts_list)

    def rule_at(self, address: int) -> FrameRule | None:
        """The unwinding rule in effect at ``address``, or None when no FDE covers it."""
        i = bisect.bisect_right(self._starts_list, address) - 1
        if i < 0:
            return None
        fde_off = int(self._fdes[i]) - self.vaddr
        if not 0 <= fde_off < len(self.data):
            return None
        parsed = self._parse_fde(fde_off)
        if parsed is None:
            return None
        cie, pc_begin, pc_range, program = parsed
        if not pc_begin <= address < pc_begin + pc_range:
            return None
        return _execute(self.data, cie, pc_begin, program, address)

    # -- parsing -----------------------------------------------------------------------------

    def _length(self, r: _Reader) -> tuple[int, int]:
        length = r.fixed("<I", 4)
        if length == 0xFFFFFFFF:
            length = r.fixed("<Q", 8)
        return length, r.pos

    def _cie(self, offset: int) -> _Cie:
        cie = self._cies.get(offset)
        if cie is not None:
            return cie
        r = _Reader(self.data, offset, self.vaddr)
        length, start = self._length(r)
        end = start + length
        r.fixed("<I", 4)  # CIE id (0)
        version = r.u8()
        aug = r.cstring()
        if b"eh" in aug:
            r.fixed("<Q", 8)
        code_align = r.uleb()
        data_align = r.sleb()
        ra_reg = r.u8() if version == 1 else r.uleb()
        fde_enc = 0x00
        if aug.startswith(b"z"):
            aug_len = r.uleb()
            aug_end = r.pos + aug_len
            for ch in aug[1:]:
                if ch == ord("R"):
                    fde_enc = r.u8()
                elif ch == ord("P"):
                    r.pointer(r.u8() & 0x7F)
                elif ch == ord("L"):
                    r.u8()
                elif ch in (ord("S"), ord("B"), ord("G")):
                    continue
                else:
                    break
            r.pos = aug_end
        cie = _Cie(code_align, data_align, ra_reg, fde_enc, aug.startswith(b"z"), (r.pos, end))
        self._cies[offset] = cie
        return cie

    def _parse_fde(self, offset: int):
        r = _Reader(self.data, offset, self.vaddr)
        length, start = self._length(r)
        if length == 0:
            return None
        end = start + length
        id_pos = r.pos
        cie_ptr = r.fixed("<I", 4)
        if cie_ptr == 0:
            return None  # a CIE, not an FDE
        cie = self._cie(id_pos - cie_ptr)
        pc_begin = r.pointer(cie.fde_encoding)
        pc_range = r.pointer(cie.fde_encoding & 0x0F)
        if cie.augmented:
            r.pos += r.uleb()
        return cie, pc_begin, pc_range, (r.pos, end)

    def _scan(self) -> tuple[np.ndarray, np.ndarray]:
        """Index every FDE by one walk over the section (modules without .eh_frame_hdr)."""
        starts, fdes = [], []
        pos = 0
        n = len(self.data)
        while pos + 4 <= n:
            r = _Reader(self.data, pos, self.vaddr)
            length, body = self._length(r)
            if length == 0:
                break
            try:
                parsed = self._parse_fde(pos)
            except (ValueError, IndexError, struct.error):
                parsed = None
            if parsed is not None:
                starts.append(parsed[1])
                fdes.append(self.vaddr + pos)
            pos = body + length
        order = np.argsort(np.array(starts, dtype=np.uint64), kind="stable")
        return (np.array(starts, dtype=np.uint64)[order], np.array(fdes, dtype=np.uint64)[order])


def _hdr_index(hdr: bytes, hdr_vaddr: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The sorted (initial location, FDE address) table of .eh_frame_hdr, read with numpy."""
    if len(hdr) < 4 or hdr[0] != 1:
        return None
    eh_ptr_enc, count_enc, table_enc = hdr[1], hdr[2], hdr[3]
    r = _Reader(hdr, 4, hdr_vaddr)
    if eh_ptr_enc == _PE_OMIT or count_enc == _PE_OMIT:
        return None
    r.pointer(eh_ptr_enc)
    count = r.pointer(count_enc)
    if table_enc != 0x3B:  # datarel | sdata4: what every toolchain emits
        return None
    table = np.frombuffer(hdr, dtype="<i4", count=2 * count, offset=r.pos).reshape(count, 2).astype(np.int64)
    table += hdr_vaddr
    return table[:, 0].astype(np.uint64), table[:, 1].astype(np.uint64)


def _execute(data, cie: _Cie, pc_begin: int, program: tuple[int, int], target: int) -> FrameRule:
    """Run the CIE's initial instructions and the FDE's program up to ``target``."""
    state = {"cfa_reg": RSP, "cfa_off": 8, "regs": {}}
    _run(data, cie, cie.initial, state, None, pc_begin, None)
    initial_regs = dict(state["regs"])
    _run(data, cie, program, state, initial_regs, pc_begin, target)
    return FrameRule(state["cfa_reg"], state["cfa_off"], state["regs"])


def _run(
    data,
    cie: _Cie,
    span: tuple[int, int],
    state: dict,
    initial_regs: dict | None,
    loc: int,
    target: int | None,
) -> None:
    r = _Reader(data, span[0], 0)
    end = span[1]
    stack: list[tuple[int | None, int, dict]] = []
    ca, da = cie.code_align, cie.data_align
    regs = state["regs"]
    while r.pos < end:
        op = r.u8()
        high, low = op & 0xC0, op & 0x3F
        if high == 0x40:  # advance_loc
            loc += low * ca
        elif high == 0x80:  # offset
            regs[low] = Rule("offset", r.uleb() * da)
        elif high == 0xC0:  # restore
            _restore(regs, initial_regs, low)
        elif op == 0x00:  # nop
            continue
        elif op == 0x01:  # set_loc
            loc = r.pointer(cie.fde_encoding)
        elif op in (0x02, 0x03, 0x04):  # advance_loc1/2/4
            loc += r.fixed({0x02: "<B", 0x03: "<H", 0x04: "<I"}[op], {0x02: 1, 0x03: 2, 0x04: 4}[op]) * ca
        elif op == 0x05:  # offset_extended
            reg = r.uleb()
            regs[reg] = Rule("offset", r.uleb() * da)
        elif op == 0x06:  # restore_extended
            _restore(regs, initial_regs, r.uleb())
        elif op == 0x07:
            regs[r.uleb()] = Rule("undefined")
        elif op == 0x08:
            regs[r.uleb()] = Rule("same")
        elif op == 0x09:
            reg = r.uleb()
            regs[reg] = Rule("register", r.uleb())
        elif op == 0x0A:  # remember_state
            stack.append((state["cfa_reg"], state["cfa_off"], dict(regs)))
        elif op == 0x0B:  # restore_state
            if stack:
                state["cfa_reg"], state["cfa_off"], saved = stack.pop()
                regs.clear()
                regs.update(saved)
        elif op == 0x0C:  # def_cfa
            state["cfa_reg"] = r.uleb()
            state["cfa_off"] = r.uleb()
        elif op == 0x0D:
            state["cfa_reg"] = r.uleb()
        elif op == 0x0E:
            state["cfa_off"] = r.uleb()
        elif op == 0x0F:  # def_cfa_expression: not evaluated
            r.pos += r.uleb()
            state["cfa_reg"] = None
        elif op in (0x10, 0x16):  # expression, val_expression
            reg = r.uleb()
            r.pos += r.uleb()
            regs[reg] = Rule("undefined")
        elif op == 0x11:  # offset_extended_sf
            reg = r.uleb()
            regs[reg] = Rule("offset", r.sleb() * da)
        elif op == 0x12:  # def_cfa_sf
            state["cfa_reg"] = r.uleb()
            state["cfa_off"] = r.sleb() * da
        elif op == 0x13:
            state["cfa_off"] = r.sleb() * da
        elif op == 0x14:  # val_offset
            reg = r.uleb()
            regs[reg] = Rule("val_offset", r.uleb() * da)
        elif op == 0x15:
            reg = r.uleb()
            regs[reg] = Rule("val_offset", r.sleb() * da)
        elif op == 0x2E:  # GNU_args_size
            r.uleb()
        elif op == 0x2F:  # GNU_negative_offset_extended
            reg = r.uleb()
            regs[reg] = Rule("offset", -r.uleb() * da)
        else:
            break  # unknown opcode: keep what we have
        if target is not None and loc > target:
            # The row in effect at target was the state before this advance; advances come
            # first in an instruction group, so undoing them is never needed: we stop here.
            break


def _restore(regs: dict, initial: dict | None, reg: int) -> None:
    if initial is not None and reg in initial:
        regs[reg] = initial[reg]
    else:
        regs.pop(reg, None)
