"""The .eh_frame reader that finds the caller past libc's wrappers, held to pyelftools' own CFI
decoder on the real libc, and to the disassembly facts of the wrappers."""

from __future__ import annotations

import ctypes.util
import random
from pathlib import Path

import pytest
from elftools.dwarf.callframe import FDE
from elftools.elf.elffile import ELFFile

from leakhunt.trace.cfi import RA, RSP, CallFrameInfo
from leakhunt.trace.symbols import ModuleCache


def _libc_path() -> str:
    for line in Path("/proc/self/maps").read_text().splitlines():
        if "/libc.so" in line or "/libc-" in line:
            return line.split()[-1]
    return ctypes.util.find_library("c")


@pytest.fixture(scope="module")
def libc():
    module = ModuleCache().open([_libc_path()], Path("/"), _libc_path())
    assert module is not None
    return module


def test_libc_syscall_wrappers_are_leaves_with_the_return_address_at_sp(libc):
    # At the instruction after `syscall` in these wrappers nothing was pushed: CFA = rsp + 8.
    for name in ("syscall", "munmap"):
        start, size = libc.function(name)
        code = libc.read(start, size)
        ip = start + code.index(b"\x0f\x05") + 2
        rule = libc.rule_at(ip)
        assert rule.cfa_reg == RSP and rule.return_slot() == 0, name


def test_a_wrapper_with_a_frame_has_its_slot_above_sp(libc):
    # mremap's wrapper makes room for a va_list before its syscall: the slot is the frame size.
    start, size = libc.function("mremap")
    code = libc.read(start, size)
    ip = start + code.index(b"\x0f\x05") + 2
    rule = libc.rule_at(ip)
    sub_rsp = code.find(b"\x48\x83\xec")  # sub $imm8, %rsp
    assert sub_rsp >= 0 and sub_rsp < code.index(b"\x0f\x05")
    assert rule.return_slot() == code[sub_rsp + 3]


def test_hdr_index_and_linear_scan_agree(libc):
    cfi = libc.cfi
    scanned = CallFrameInfo(cfi.data, cfi.vaddr)  # no .eh_frame_hdr: one walk over the section
    assert len(scanned) == len(cfi) > 1000
    assert (scanned._starts == cfi._starts).all()


def test_cfa_rules_match_pyelftools_on_libc(libc):
    """Every row of a sample of libc's FDEs, as pyelftools decodes them, gives the same CFA and
    return-address rule as our reader at that address."""
    with open(_libc_path(), "rb") as f:
        entries = [e for e in ELFFile(f).get_dwarf_info().EH_CFI_entries() if isinstance(e, FDE)]
        rng = random.Random(5)
        checked = 0
        for fde in rng.sample(entries, 400):
            try:
                table = fde.get_decoded().table
            except Exception:  # pyelftools does not know every GNU opcode: those are not a reference
                continue
            for i, row in enumerate(table):
                end = (
                    table[i + 1]["pc"]
                    if i + 1 < len(table)
                    else fde["initial_location"] + fde["address_range"]
                )
                for pc in {row["pc"], end - 1}:
                    ours = libc.rule_at(pc)
                    cfa = row["cfa"]
                    if cfa.expr is not None:
                        assert ours.cfa_reg is None
                        continue
                    assert (ours.cfa_reg, ours.cfa_offset) == (cfa.reg, cfa.offset), hex(pc)
                    if RA in row:
                        assert ours.return_address.value == row[RA].arg, hex(pc)
                    checked += 1
        assert checked > 500
