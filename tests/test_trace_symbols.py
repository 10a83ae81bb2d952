"""Addresses of live processes resolved to module + symbol + offset, and libucm's in-memory
patching of libc detected, on real processes (no BPF needed)."""

from __future__ import annotations

import shutil
import subprocess

from conftest import need

from leakhunt.trace.patched import find_patched, patched_note
from leakhunt.trace.symbols import ModuleCache, parse_maps
from leakhunt.trace.unwind import CallerResolver, is_wrapper_module

UCM_C = r"""
#include <stdio.h>
#include <signal.h>
#include <unistd.h>
#include <sys/mman.h>
#include <ucm/api/ucm.h>
static volatile long events;
static volatile sig_atomic_t stop;
static void on_term(int s) { (void)s; stop = 1; }
static void count(ucm_event_type_t t, ucm_event_t *e, void *arg) { (void)t; (void)e; (void)arg; events++; }
int main(void) {
    signal(SIGTERM, on_term);
    /* Installing handlers makes libucm patch libc's mmap, munmap... (its default "bistro" mode). */
    ucs_status_t st = ucm_set_event_handler(UCM_EVENT_MMAP | UCM_EVENT_MUNMAP | UCM_EVENT_VM_UNMAPPED, 0,
                                            count, NULL);
    printf("ready %d %d\n", (int)getpid(), (int)st);
    fflush(stdout);
    while (!stop) {
        for (int i = 0; i < 20; i++) {
            char *p = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) return 1;
            p[0] = 1;
            munmap(p, 1 << 20);
        }
        usleep(20000);
    }
    printf("events %ld\n", events);
    return events > 0 ? 0 : 3;
}
"""


def build_ucm_target(directory) -> str:
    """The libucm target the trace tests share: a program whose libc is hooked by UCX."""
    need(shutil.which("cc") is not None, "needs a C compiler")
    need(
        subprocess.run(
            ["sh", "-c", "echo 'int main(){}' | cc -x c - -o /dev/null -lucm -lucs"], capture_output=True
        ).returncode
        == 0,
        "needs libucx-dev (libucm)",
    )
    src = directory / "ucm_target.c"
    src.write_text(UCM_C)
    exe = directory / "ucm_target"
    subprocess.run(["cc", "-O2", "-g", "-o", str(exe), str(src), "-lucm", "-lucs"], check=True)
    return str(exe)


def test_maps_parser_keeps_file_mappings_with_their_map_files_name():
    text = (
        b"7f00a000-7f00b000 r-xp 00001000 fe:00 123  /usr/lib/libx.so\n"
        b"7f00b000-7f00c000 rw-p 00000000 00:00 0 \n"
        b"7f00c000-7f00d000 r--p 00000000 fe:00 124  /usr/lib/with space.so (deleted)\n"
    )
    maps = parse_maps(text)
    assert [(m.path, m.executable, m.range_text) for m in maps] == [
        ("/usr/lib/libx.so", True, "7f00a000-7f00b000"),
        ("/usr/lib/with space.so (deleted)", False, "7f00c000-7f00d000"),
    ]


def test_functions_of_a_live_process_resolve_to_their_names(spawn, leakers):
    proc = spawn([leakers / "pool_leaker", "--rate", "1M"])
    resolver = CallerResolver()
    pm = resolver.modules(proc.pid)
    lib = next(m for m in pm.mappings if m.path.endswith("libleakpool.so") and m.executable)
    module = pm.module(lib)
    for name in ("lkpool_grow", "lkpool_mpool_get"):  # exported, and static (from .symtab)
        start, size = module.function(name)
        address = lib.start - lib.offset + module.file_offset(start)
        frame = pm.frame(address + 4, is_return=False)
        assert (frame.library, frame.symbol, frame.offset) == ("libleakpool.so", name, 4)
        # A return address just past the end of a function belongs to that function (call at the end).
        assert pm.frame(address + size, is_return=True).symbol == name
    libc = next(m for m in pm.mappings if is_wrapper_module(m.path) and m.executable)
    versioned = pm.module(libc).symbolize(pm.module(libc).function("__libc_start_main")[0])
    assert versioned is not None and "@" not in versioned[0]


def test_modules_are_read_once_per_build_id(spawn, leakers):
    a = spawn([leakers / "pool_leaker", "--rate", "1M"])
    b = spawn([leakers / "pool_leaker", "--rate", "1M"])
    resolver = CallerResolver(ModuleCache())
    mods = []
    for pid in (a.pid, b.pid):
        pm = resolver.modules(pid)
        m = next(m for m in pm.mappings if m.path.endswith("libleakpool.so") and m.executable)
        mods.append(pm.module(m))
    assert mods[0] is mods[1] is not None


def test_unpatched_libc_is_reported_clean(spawn, leakers):
    proc = spawn([leakers / "pool_leaker", "--rate", "1M"])
    assert find_patched(proc.pid) == []
    assert patched_note([]) is None


def test_libucm_hooks_are_detected_in_libc(spawn, tmp_path):
    proc = spawn([build_ucm_target(tmp_path)])
    patched = {p.symbol: p for p in find_patched(proc.pid)}
    assert {"mmap", "munmap"} <= set(patched)
    assert patched["mmap"].jumps_to is not None and "libucm" in patched["mmap"].jumps_to.library
    assert patched["mmap"].jumps_to.symbol.startswith("ucm_override")
    assert "libucm" in patched_note(list(patched.values()))
    assert proc.alive()
