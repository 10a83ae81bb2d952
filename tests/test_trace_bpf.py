"""The BPF backends on real processes: the ledger's every shape (partial unmaps, mremap, MAP_FIXED,
brk, shm) through the kernel-side ledger and through streamed events, children with --follow,
and a target whose libc is patched by libucm, which must survive and be named."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
from conftest import need
from test_trace_symbols import build_ucm_target

from leakhunt.proc.target import open_target
from leakhunt.trace.backend import TraceOptions, backend_class
from leakhunt.trace.session import TraceSession

pytestmark = pytest.mark.bpf
BACKENDS = ["bcc", "bpftrace"]
P = 4096

SHAPES_C = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <unistd.h>
#define P 4096
#define NOINLINE __attribute__((noinline))
#define RW PROT_READ | PROT_WRITE
#define ANON MAP_PRIVATE | MAP_ANONYMOUS
static volatile sig_atomic_t stop;
static void on_term(int s) { (void)s; stop = 1; }
static char *map(size_t n) { return mmap(NULL, n, RW, ANON, -1, 0); }

/* Each shape calls the libc wrappers itself, so it is the caller past the wrapper. */
NOINLINE void shape_partial(void) {          /* 8 pages, the middle 2 unmapped: 6 left */
    char *p = mmap(NULL, 8 * P, RW, ANON, -1, 0);
    memset(p, 1, 8 * P);
    munmap(p + 2 * P, 2 * P);
}
NOINLINE void shape_head_tail(void) {        /* 8 pages, 1 off the head, 2 off the tail: 5 left */
    char *p = mmap(NULL, 8 * P, RW, ANON, -1, 0);
    munmap(p, P);
    munmap(p + 6 * P, 2 * P);
}
NOINLINE void shape_mremap(void) {           /* 4 pages grown to 16 (moved, maybe): 16 left */
    char *p = mmap(NULL, 4 * P, RW, ANON, -1, 0);
    p = mremap(p, 4 * P, 16 * P, MREMAP_MAYMOVE);
    memset(p, 1, 16 * P);
}
NOINLINE char *shape_reserve(void) {         /* 16 pages reserved... */
    return mmap(NULL, 16 * P, PROT_NONE, ANON | MAP_NORESERVE, -1, 0);
}
NOINLINE void shape_commit(char *base) {     /* ...4 of them replaced with MAP_FIXED: 12 + 4 */
    mmap(base + 4 * P, 4 * P, RW, ANON | MAP_FIXED, -1, 0);
}
NOINLINE void shape_balanced(void) {         /* 100 mappings, all unmapped: 0 left */
    for (int i = 0; i < 100; i++) {
        char *p = mmap(NULL, 16 * P, RW, ANON, -1, 0);
        p[0] = 1;
        munmap(p, 16 * P);
    }
}
NOINLINE void shape_shm(void) {              /* a 64 KiB System V segment left attached */
    int id = shmget(IPC_PRIVATE, 16 * P, IPC_CREAT | 0600);
    shmat(id, NULL, 0);
    shmctl(id, IPC_RMID, NULL);
}
NOINLINE void shape_shm_detached(void) {     /* attached and detached: 0 left */
    int id = shmget(IPC_PRIVATE, 16 * P, IPC_CREAT | 0600);
    void *p = shmat(id, NULL, 0);
    shmdt(p);
    shmctl(id, IPC_RMID, NULL);
}
NOINLINE void shape_brk(void) {              /* the program break grown by 1 MiB */
    sbrk(1 << 20);
}
NOINLINE void child_leak(void) {             /* --fork: a child maps 10 x 1 MiB and keeps them */
    for (int i = 0; i < 10; i++)
        map(1 << 20)[0] = 1;
}

int main(int argc, char **argv) {
    int fork_mode = argc > 1 && !strcmp(argv[1], "--fork");
    signal(SIGTERM, on_term);
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    if (fork_mode) {
        pid_t child = fork();
        if (child == 0) {
            child_leak();
            printf("child %d\n", (int)getpid());
            fflush(stdout);
            while (!stop) pause();
            return 0;
        }
        while (!stop) pause();
        kill(child, SIGTERM);
        waitpid(child, NULL, 0);
        return 0;
    }
    shape_partial();
    shape_head_tail();
    shape_mremap();
    shape_commit(shape_reserve());
    shape_balanced();
    shape_shm();
    shape_shm_detached();
    shape_brk();
    printf("done\n");
    fflush(stdout);
    while (!stop) pause();
    return 0;
}
"""

EXPECTED = {
    "shape_partial": 6 * P,
    "shape_head_tail": 5 * P,
    "shape_mremap": 16 * P,
    "shape_reserve": 12 * P,
    "shape_commit": 4 * P,
    "shape_shm": 16 * P,
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
    need(shutil.which("cc") is not None, "needs a C compiler")
    d = tmp_path_factory.mktemp("shapes")
    (d / "shapes.c").write_text(SHAPES_C)
    # No sibling calls: a shape ending in `return mmap(...)` would hand its frame to mmap.
    subprocess.run(
        ["cc", "-O2", "-g", "-fno-optimize-sibling-calls", "-o", str(d / "shapes"), str(d / "shapes.c")],
        check=True,
    )
    return str(d / "shapes")


def trace(proc, backend: str, action, settle: float = 1.0, **options) -> TraceSession:
    """Attach, run ``action`` (which makes the target act), trace a little more, stop."""
    target = open_target(proc.pid)
    session = TraceSession(target, backend_class(backend)(target, TraceOptions(**options)))
    session.start()
    try:
        action()
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            session.step(0.3)
    finally:
        session.stop()
    return session


def go_and_wait(proc, word: str = "done"):
    def action():
        proc.popen.stdin.write("go\n")
        proc.popen.stdin.flush()
        assert proc.popen.stdout.readline().startswith(word)

    return action


def by_symbol(session: TraceSession) -> dict[str, int]:
    return {c.totals.symbol: c.totals.outstanding_bytes for c in session.callers()}


@pytest.mark.parametrize("all_events", [False, True], ids=["kernel-ledger", "all-events"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_shape_of_mapping_is_accounted(spawn, shapes, backend, all_events):
    proc = spawn([shapes], stdin=subprocess.PIPE)
    session = trace(proc, backend, go_and_wait(proc), extra={"stream_all": all_events})
    held = by_symbol(session)
    for symbol, expected in EXPECTED.items():
        assert held.get(symbol) == expected, (symbol, held)
    assert held.get("shape_balanced", 0) == 0
    assert held.get("shape_shm_detached", 0) == 0
    # brk growth belongs to sbrk in libc; the unwound stack names the shape that called it.
    brk = next(c.totals for c in session.callers() if "sbrk" in c.totals.symbol)
    assert 1 << 20 <= brk.outstanding_bytes < 2 << 20
    assert any(f.symbol == "shape_brk" for f in brk.stack.frames)
    balanced = next(c.totals for c in session.callers() if c.totals.symbol == "shape_balanced")
    assert (balanced.count, balanced.mapped_bytes, balanced.unmapped_bytes) == (100, 1600 * P, 1600 * P)
    by_kind = session.ledger.kernel_syscalls
    assert (by_kind["mremap"], by_kind["shmat"], by_kind["shmdt"]) == (1, 2, 1), by_kind
    assert by_kind["brk"] >= 1 and by_kind["munmap"] >= 103 and by_kind["mmap"] >= 105
    assert session.backend.stats.lost_events == 0
    if all_events:
        assert session.streamed >= 100
    assert proc.alive()


@pytest.mark.parametrize("backend", BACKENDS)
def test_follow_counts_the_children_forked_while_tracing(spawn, shapes, backend):
    proc = spawn([shapes, "--fork"], stdin=subprocess.PIPE)
    followed = trace(proc, backend, go_and_wait(proc, "child"), follow=True)
    assert by_symbol(followed).get("child_leak") == 10 << 20
    child = next(c.totals for c in followed.callers() if c.totals.symbol == "child_leak")
    assert child.stack.frames[0].library.startswith("libc")


def test_without_follow_a_child_is_not_traced(spawn, shapes):
    proc = spawn([shapes, "--fork"], stdin=subprocess.PIPE)
    session = trace(proc, "bcc", go_and_wait(proc, "child"))
    assert "child_leak" not in by_symbol(session)


@pytest.mark.parametrize("backend", BACKENDS)
def test_libucm_target_survives_and_its_hooks_are_named(spawn, tmp_path, backend):
    """libucm patches libc's mmap/munmap in memory; the tracer must not disturb it, must say
    the code is patched, and must name the hooks' own syscall sites as callers."""
    proc = spawn([build_ucm_target(tmp_path)])
    session = trace(proc, backend, lambda: None, settle=1.5)
    assert proc.alive()
    assert any("libucm" in note and "patched" in note for note in session.backend.stats.notes)
    callers = [c.totals for c in session.callers()]
    ucm = [c for c in callers if "libucm" in c.library and c.count]
    assert ucm and ucm[0].symbol.startswith("ucm_orig_"), [c.label for c in callers]
    assert any(f.symbol == "ucm_mmap" for f in ucm[0].stack.frames)
    proc.popen.terminate()
    assert proc.popen.wait(10) == 0  # and it ran its hooks all along (exit 3 if no events)


def test_lost_events_are_counted_exactly(spawn, shapes):
    """A ring buffer of one page cannot take a burst of a few hundred calls: every call is
    either delivered or counted lost, none vanishes."""
    proc = spawn([shapes], stdin=subprocess.PIPE)
    session = trace(proc, "bcc", go_and_wait(proc), extra={"stream_all": True, "ring_pages": 1})
    stats = session.backend.stats
    assert stats.lost_events > 0
    assert session.streamed + stats.lost_events == stats.events > 200
