"""The gdb backend's pieces that need no gdb: breakpoint planning against a live libc, conditions,
budgets, symbol text, frames into stacks, and the guard that puts original code back."""

from __future__ import annotations

import ctypes
import os

import pytest

from leakhunt.gdb.backend import GDB_EVERY, GDB_MAX_HITS, GdbBackend, config_from_options, gdb_extra
from leakhunt.gdb.budget import Budget, CostMeter
from leakhunt.gdb.frames import PythonFrame, Symbolizer, caller_of, parse_symbol
from leakhunt.gdb.guard import INT3, BreakpointGuard
from leakhunt.gdb.memory import AddressSpace
from leakhunt.gdb.sites import VIA_SYSCALL, VIA_WRAPPER, condition_for, plan_sites
from leakhunt.proc.target import open_target, read_memory, write_memory
from leakhunt.trace.backend import TraceOptions, backend_class
from leakhunt.trace.events import EventKind


def _libc_function(name: str) -> int:
    return ctypes.cast(getattr(ctypes.CDLL(None), name), ctypes.c_void_p).value


def test_sites_are_the_exact_entry_of_libc_functions_in_the_live_process():
    space = AddressSpace(open_target(os.getpid()))
    sites = plan_sites(space, frozenset({EventKind.MMAP, EventKind.MUNMAP}))
    by = {(s.kind, s.via): s for s in sites}
    assert by[(EventKind.MMAP, VIA_SYSCALL)].address == _libc_function("syscall")
    assert by[(EventKind.MMAP, VIA_WRAPPER)].address == _libc_function("mmap")
    assert by[(EventKind.MUNMAP, VIA_WRAPPER)].address == _libc_function("munmap")
    # mmap and mmap64 are one function in glibc: one breakpoint, not two hits per call
    assert len([s for s in sites if s.kind is EventKind.MMAP and s.via == VIA_WRAPPER]) == 1


def test_syscall_sites_are_conditional_on_the_number_and_wrappers_are_not():
    space = AddressSpace(open_target(os.getpid()))
    for site in plan_sites(space, frozenset({EventKind.MMAP, EventKind.MUNMAP, EventKind.MREMAP})):
        if site.via == VIA_SYSCALL:
            assert site.condition == f"$rdi == {({'mmap': 9, 'munmap': 11, 'mremap': 25})[site.kind.value]}"
        else:
            assert site.condition is None


def test_length_threshold_goes_into_the_condition_on_the_right_register():
    assert (
        condition_for(EventKind.MMAP, VIA_SYSCALL, 1 << 20) == "$rdi == 9 && (unsigned long)$rdx >= 1048576"
    )
    assert condition_for(EventKind.MMAP, VIA_WRAPPER, 4096) == "(unsigned long)$rsi >= 4096"
    assert (
        condition_for(EventKind.MREMAP, VIA_WRAPPER, 8192)
        == "((unsigned long)$rsi >= 8192 || (unsigned long)$rdx >= 8192)"
    )
    assert condition_for(EventKind.SHMDT, VIA_WRAPPER, 8192) is None  # no length to test


def test_site_registers_shift_by_one_through_syscall():
    space = AddressSpace(open_target(os.getpid()))
    sites = {(s.kind, s.via): s for s in plan_sites(space, frozenset({EventKind.MMAP}))}
    assert sites[(EventKind.MMAP, VIA_SYSCALL)].registers == ("rsi", "rdx", "rcx", "r8", "r9")
    assert sites[(EventKind.MMAP, VIA_WRAPPER)].registers == ("rdi", "rsi", "rdx", "rcx", "r8")


def test_budget_ends_on_hits_or_time_and_rejects_nonsense():
    assert Budget(max_hits=3).exhausted(2, started=0.0, now=1.0) is None
    assert "hit budget" in Budget(max_hits=3).exhausted(3, started=0.0, now=1.0)
    assert "time budget" in Budget(max_seconds=5).exhausted(0, started=10.0, now=15.0)
    assert Budget().exhausted(10**9, started=0.0, now=10**9) is None
    for bad in (dict(max_hits=0), dict(max_seconds=0), dict(every_nth=0)):
        with pytest.raises(ValueError):
            Budget(**bad)


def test_cost_meter_reports_total_mean_and_tail():
    meter = CostMeter()
    for s in [0.001] * 99 + [0.010]:
        meter.add_hit(s)
    assert meter.hits == 100
    assert meter.stopped_s == pytest.approx(0.109)
    assert meter.mean_hit_s == pytest.approx(0.00109)
    assert meter.percentile(0.99) == pytest.approx(0.010)
    assert "100 hits" in meter.summary()


def test_symbol_text_from_gdb():
    assert parse_symbol("0x7f0012 <lkpool_grow+23>") == ("lkpool_grow", 23)
    assert parse_symbol("0x401000 <main>") == ("main", 0)
    assert parse_symbol("0x55d2 <std::vector<int, std::allocator<int> >::push_back(int const&)+9>") == (
        "std::vector<int, std::allocator<int> >::push_back(int const&)",
        9,
    )
    assert parse_symbol("0x7fff00001000") == (None, None)


def test_mi_frames_become_a_stack_with_modules_offsets_and_python_frames():
    space = AddressSpace(open_target(os.getpid()))
    syscall = _libc_function("syscall")
    caller = _libc_function("mmap") + 0x10  # any address inside libc will do as a "caller"
    frames = [
        {"level": "0", "addr": hex(syscall), "func": "syscall"},
        {"level": "1", "addr": hex(caller), "func": "mmap"},
        {"level": "2", "addr": hex(caller), "func": "_PyEval_EvalFrameDefault"},
        {"level": "3", "addr": hex(caller), "func": "main"},
    ]
    sym = Symbolizer(space)
    assert sym.unknown(frames) == [syscall, caller - 1]  # each address asked about once
    sym.learn(syscall, f"{syscall:#x} <syscall>")
    sym.learn(caller - 1, f"{caller - 1:#x} <mmap+15>")
    stack = sym.stack(frames, depth_limit=128, python=[PythonFrame("Pool.grow", "/srv/pool.py", 42, 2)])
    assert not stack.partial and stack.source == "gdb"  # it reached main
    assert [f.symbol for f in stack.frames] == [
        "syscall",
        "mmap",
        "_PyEval_EvalFrameDefault",
        "Pool.grow",
        "main",
    ]
    assert stack.frames[1].offset == 0x10  # looked up at address - 1, reported at address
    assert stack.frames[0].module.rsplit("/", 1)[-1].startswith("libc")
    assert str(stack.frames[3]) == "Pool.grow (pool.py:42)"
    assert caller_of(stack) == stack.frames[1]
    assert sym.stack(frames[:2], depth_limit=2).partial  # cut by the depth limit


def test_guard_puts_back_original_code_only_over_int3(spawn, leakers):
    proc = spawn([leakers / "steady", "--rate", "0"])
    space = AddressSpace(open_target(proc.pid))
    sites = plan_sites(space, frozenset({EventKind.SHMAT, EventKind.SHMDT}), vias=(VIA_WRAPPER,))
    shmat, shmdt = (s.address for s in sites)  # functions the steady leaker never calls
    original = read_memory(proc.pid, shmat, 1), read_memory(proc.pid, shmdt, 1)
    guard = BreakpointGuard(space)
    guard.protect(shmat)
    guard.protect(shmdt)
    assert write_memory(proc.pid, shmat, bytes([INT3]))  # what gdb's breakpoint looks like
    assert write_memory(proc.pid, shmdt, b"\x90")  # not ours to touch: no int3 there
    assert guard.restore() == 1
    assert read_memory(proc.pid, shmat, 1) == original[0]
    assert read_memory(proc.pid, shmdt, 1) == b"\x90"
    write_memory(proc.pid, shmdt, original[1])
    assert proc.alive()


def test_gdb_knobs_travel_in_trace_options_extra():
    options = TraceOptions(min_length=4096, extra=gdb_extra(max_hits=7, every=3, gdb_path="cuda-gdb"))
    config = config_from_options(options)
    assert (config.budget.max_hits, config.budget.every_nth, config.gdb_path, config.min_length) == (
        7,
        3,
        "cuda-gdb",
        4096,
    )
    with pytest.raises(ValueError):
        config_from_options(TraceOptions(extra={GDB_MAX_HITS: 0}))
    with pytest.raises(ValueError):
        config_from_options(TraceOptions(extra={GDB_EVERY: 0}))
    assert backend_class("gdb") is GdbBackend
