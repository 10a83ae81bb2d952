"""The BCC probe decides unmaps in the kernel: an unmap that touches no tracked mapping is counted
and never streamed (the range index of probes/range_index.h), one that cuts a tracked mapping
always reaches user space. Checked on a real process making every shape of unmap the index
must get right, with the exact count of what was streamed and what was decided in the kernel;
and path keys: two paths through one caller are two sites, each with its own stack."""

from __future__ import annotations

import select
import shutil
import subprocess

import pytest
from conftest import need
from test_trace_bpf import go_and_wait, trace

from leakhunt.proc.target import open_target
from leakhunt.trace.backend import TraceOptions, backend_class
from leakhunt.trace.session import TraceSession

pytestmark = pytest.mark.bpf
P = 4096
MiB = 1 << 20

INDEX_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#define P 4096UL
#define MiB (1UL << 20)
#define GiB (1UL << 30)
#define NOINLINE __attribute__((noinline))
#define RW PROT_READ | PROT_WRITE
#define ANON MAP_PRIVATE | MAP_ANONYMOUS
static volatile sig_atomic_t stop;
static void on_term(int s) { (void)s; stop = 1; }

/* Address space prepared before tracing starts: reservations nobody traced (PROT_NONE), inside
 * which the shapes place their mappings with MAP_FIXED; and holes far below where the kernel
 * places mappings (16 TiB: mmap works down from near 128 TiB, the program sits near 94), so
 * that no mapping made later can land in one. */
static char *hole = (char *)(16UL << 40), *huge_hole = (char *)(17UL << 40), *span, *big, *zap, *cover;

static char *reserve(size_t n) { return mmap(NULL, n, PROT_NONE, ANON | MAP_NORESERVE, -1, 0); }
static char *align2m(char *p) { return (char *)(((uintptr_t)p + 2 * MiB - 1) & ~(2 * MiB - 1)); }

NOINLINE void holes(void) {                  /* 1000 munmaps of a hole: decided in the kernel */
    for (int i = 0; i < 1000; i++)
        munmap(hole, 16 * P);
}
NOINLINE void partial(void) {                /* 8 pages, the middle 2 cut: streamed, 6 left */
    char *p = mmap(NULL, 8 * P, RW, ANON, -1, 0);
    munmap(p + 2 * P, 2 * P);
}
NOINLINE void span_map(void) {               /* three 4-page mappings at pages 0, 8 and 16 */
    for (int i = 0; i < 3; i++)
        mmap(span + 8 * i * P, 4 * P, RW, ANON | MAP_FIXED, -1, 0);
}
NOINLINE void span_cut(void) {               /* one unmap over pages 2..18: cuts all three */
    munmap(span + 2 * P, 16 * P);
}
NOINLINE void huge_nothing(void) {           /* 1 TiB of nothing */
    munmap(huge_hole, 1024 * GiB);
}
NOINLINE void big_map(void) {                /* 2 MiB, aligned, 4 GiB into an 8 GiB reservation */
    mmap(big + 4 * GiB, 2 * MiB, RW, ANON | MAP_FIXED, -1, 0);
}
NOINLINE void big_cut(void) {                /* the whole 8 GiB: it holds that mapping */
    munmap(big, 8 * GiB);
}
NOINLINE void big_again(void) {              /* the same 8 GiB again: nothing there now */
    munmap(big, 8 * GiB);
}
NOINLINE char *whole(void) {                 /* 8 MiB: wholly covers at least three 2 MiB blocks */
    return mmap(NULL, 8 * MiB, RW, ANON, -1, 0);
}
NOINLINE void whole_cut(char *p) {           /* one page in the middle of a wholly covered block */
    munmap(align2m(p) + 2 * MiB + 64 * P, P);
}
NOINLINE void whole_again(char *p) {         /* that page again: a hole now */
    munmap(align2m(p) + 2 * MiB + 64 * P, P);
}
NOINLINE void zap_map(void) {                /* four 4-page mappings in one 2 MiB block */
    for (int i = 0; i < 4; i++)
        mmap(align2m(zap) + 64 * i * P, 4 * P, RW, ANON | MAP_FIXED, -1, 0);
}
NOINLINE void zap_cut(void) {                /* 4 MiB from the block's start: covers it wholly */
    munmap(align2m(zap), 4 * MiB);
}
NOINLINE void zap_after(void) {              /* inside where the second mapping was: a hole */
    munmap(align2m(zap) + 65 * P, 2 * P);      /* (not its exact range: see below) */
}
NOINLINE void relink(void) {                 /* 8 pages in the block the zap emptied */
    mmap(align2m(zap) + 128 * P, 8 * P, RW, ANON | MAP_FIXED, -1, 0);
}
NOINLINE void relink_cut(void) {             /* its middle 2: streamed, 6 left (the zap unlinked */
    munmap(align2m(zap) + 130 * P, 2 * P);     /* the block: the set must link it again) */
}
NOINLINE void balanced(void) {               /* 1000 exact pairs: decided in the kernel */
    for (int i = 0; i < 1000; i++) {
        char *p = mmap(NULL, 16 * P, RW, ANON, -1, 0);
        munmap(p, 16 * P);
    }
}
NOINLINE void exact_twice(void) {            /* an exact unmap, then the same range again */
    char *p = mmap(NULL, 4 * P, RW, ANON, -1, 0);
    munmap(p, 4 * P);
    munmap(p, 4 * P);
}

/* A hole in a block nothing covers: the probe remembers, per CPU, that no bit above the block's
 * own node covers it, and asks that node alone next time. A mapping that covers the block wholly
 * must end that: its cut at the hole's pages is streamed. (On one CPU, so that the probe's
 * memory of the block is the one asked.) */
static char *cover_at(void) { return align2m(cover) + 2 * MiB + 16 * P; }
static void pin(int cpu);
NOINLINE void cover_holes(void) {            /* twice: the second is asked of the block alone */
    pin(0);
    munmap(cover_at(), 4 * P);
    munmap(cover_at(), 4 * P);
}
NOINLINE void cover_map(void) {              /* 4 MiB, 2 MiB aligned, over the hole's block */
    mmap(align2m(cover) + 2 * MiB, 4 * MiB, RW, ANON | MAP_FIXED, -1, 0);
}
NOINLINE void cover_cut(void) {              /* the hole's pages, in that mapping now: streamed */
    munmap(cover_at(), 4 * P);
}

/* The same at the edge of two 512 GiB roots (16 TiB): the last block below it remembered, a page
 * mapped above it, then two pages across it. The block alone must not answer for the whole. */
NOINLINE void edge_holes(void) {             /* the last block below the edge, twice */
    munmap(hole - 2 * P, P);
    munmap(hole - 2 * P, P);
}
NOINLINE void edge_map(void) {               /* the first page of the next root */
    mmap(hole, P, RW, ANON | MAP_FIXED, -1, 0);
}
NOINLINE void edge_cut(void) {               /* a page each side of the edge: cuts that page */
    munmap(hole - P, 2 * P);
}

/* Young mappings (the probe keeps each CPU's newest in a slot of its own, not in its map) unmapped
 * by a thread on the other CPU: it must find them in the first CPU's slot. The unmapper is
 * started before the mappings are made: its stack's mmap would push them out of the slot. */
static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);   /* on one CPU it fails, and all runs there */
}
static char *cut_at;
static size_t cut_len;
static int turn;                             /* 1: the unmapper's, 2: it is done for good */
static void *unmapper(void *arg) {
    (void)arg;
    pin(1);
    for (;;) {
        int t = __atomic_load_n(&turn, __ATOMIC_ACQUIRE);
        if (t == 2)
            return NULL;
        if (t == 1) {
            munmap(cut_at, cut_len);
            __atomic_store_n(&turn, 0, __ATOMIC_RELEASE);
        }
    }
}
static void unmap_elsewhere(char *at, size_t len) {
    cut_at = at;
    cut_len = len;
    __atomic_store_n(&turn, 1, __ATOMIC_RELEASE);
    while (__atomic_load_n(&turn, __ATOMIC_ACQUIRE) == 1)
        ;
}
NOINLINE char *young(void) {                 /* 8 pages, made on CPU 0 */
    return mmap(NULL, 8 * P, RW, ANON, -1, 0);
}
NOINLINE void young_elsewhere(void) {        /* one unmapped exactly on CPU 1, one cut there: */
    pthread_t t;                               /* 6 pages left, one call streamed */
    pin(0);
    pthread_create(&t, NULL, unmapper, NULL);
    unmap_elsewhere(young(), 8 * P);
    char *q = young();
    unmap_elsewhere(q + 2 * P, 2 * P);
    __atomic_store_n(&turn, 2, __ATOMIC_RELEASE);
    pthread_join(t, NULL);
}

int main(void) {
    signal(SIGTERM, on_term);
    span = reserve(64 * P);
    big = reserve(8 * GiB);
    zap = reserve(8 * MiB);
    cover = reserve(8 * MiB);
    if (span == MAP_FAILED || big == MAP_FAILED || zap == MAP_FAILED || cover == MAP_FAILED)
        return 1;
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    holes();
    partial();
    span_map();
    span_cut();
    huge_nothing();
    big_map();
    big_cut();
    big_again();
    char *w = whole();
    whole_cut(w);
    whole_again(w);
    zap_map();
    zap_cut();
    zap_after();
    relink();
    relink_cut();
    balanced();
    exact_twice();
    cover_holes();
    cover_map();
    cover_cut();
    edge_holes();
    edge_map();
    edge_cut();
    young_elsewhere();
    printf("done\n");
    fflush(stdout);
    while (!stop) pause();
    return 0;
}
"""

#: Outstanding bytes by the function that mapped them.
HELD = {
    "partial": 6 * P,
    "span_map": 4 * P,
    "big_map": 0,
    "whole": 8 * MiB - P,
    "zap_map": 0,
    "relink": 6 * P,
    "balanced": 0,
    "young": 6 * P,
    "cover_map": 4 * MiB - 4 * P,
    "edge_map": 0,
}
#: The unmaps that cut tracked mappings: partial, span_cut, big_cut, whole_cut, zap_cut, relink_cut,
#: cover_cut, edge_cut and young_elsewhere's cut.
STREAMED = 9
#: The unmaps of nothing tracked: 1000 holes, the 1 TiB, big_again, whole_again, zap_after,
#: exact_twice's second, cover_holes' two, edge_holes' two. (An unmap of the exact range of a
#: mapping a streamed unmap cut earlier still meets that mapping's kernel entry, which only user
#: space knows is gone: it is counted as that mapping's unmap, and user space drops the entry's
#: remains at the next snapshot.)
UNTRACKED = 1000 + 9

TWO_PATHS_C = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#define NOINLINE __attribute__((noinline))
static volatile sig_atomic_t stop;
static void on_term(int s) { (void)s; stop = 1; }

/* One caller of syscall(SYS_mmap), reached by two paths: libucm's shape (its hook's balanced
 * mmap and its pool's growth both return into ucm_orig_mmap_syscall). */
NOINLINE void *raw_map(size_t n) {
    return (void *)syscall(SYS_mmap, NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}
NOINLINE void churn_path(void) {             /* balanced, and first: the old exemplar */
    void *p = raw_map(1 << 16);
    munmap(p, 1 << 16);
}
NOINLINE void leak_path(void) {              /* kept */
    raw_map(1 << 16);
}

int main(void) {
    signal(SIGTERM, on_term);
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    /* Over a second and more, as a server would: the probe learns a path's frames from its
     * first call's stack, so the calls of the first few milliseconds share one key. */
    for (int i = 0; i < 2000; i++) {
        churn_path();
        if (i % 10 == 9)
            leak_path();
        usleep(500);
    }
    printf("done\n");
    fflush(stdout);
    while (!stop) pause();
    return 0;
}
"""


def build(tmp_path_factory, name: str, source: str) -> str:
    need(shutil.which("cc") is not None, "needs a C compiler")
    d = tmp_path_factory.mktemp(name)
    (d / f"{name}.c").write_text(source)
    cmd = ["cc", "-O2", "-g", "-fno-optimize-sibling-calls", "-fno-inline", "-o", str(d / name)]
    subprocess.run([*cmd, str(d / f"{name}.c")], check=True)
    return str(d / name)


@pytest.fixture(scope="module")
def index_shapes(tmp_path_factory) -> str:
    return build(tmp_path_factory, "index_shapes", INDEX_C)


@pytest.fixture(scope="module")
def two_paths(tmp_path_factory) -> str:
    return build(tmp_path_factory, "two_paths", TWO_PATHS_C)


def held_by(session) -> dict[str, int]:
    return {c.totals.symbol: c.totals.outstanding_bytes for c in session.callers()}


def test_unmaps_of_untracked_memory_never_leave_the_kernel(spawn, index_shapes):
    proc = spawn([index_shapes], stdin=subprocess.PIPE)
    session = trace(proc, "bcc", go_and_wait(proc))
    held = held_by(session)
    for symbol, expected in HELD.items():
        assert held.get(symbol, 0) == expected, (symbol, sorted(held.items()))
    stats = session.backend.stats
    assert session.streamed == STREAMED, (session.streamed, stats)
    assert stats.untracked == UNTRACKED
    assert stats.lost_events == 0
    assert session.backend.details()["kernel_map_full"] == 0
    assert not any("refused" in n for n in stats.notes)
    assert proc.alive()


def test_the_same_shapes_are_accounted_alike_when_every_call_is_streamed(spawn, index_shapes):
    """--all-events keeps no index: user space sees every call and must reach the same ledger."""
    proc = spawn([index_shapes], stdin=subprocess.PIPE)
    session = trace(proc, "bcc", go_and_wait(proc), extra={"stream_all": True})
    held = held_by(session)
    for symbol, expected in HELD.items():
        assert held.get(symbol, 0) == expected, (symbol, sorted(held.items()))


def trace_while_running(proc, backend: str) -> TraceSession:
    """Start the target's work and poll the tracer all along, as trace-mmap does, until it says
    done: what the tracer learns early (the frames of a path) serves the calls that follow."""
    target = open_target(proc.pid)
    session = TraceSession(target, backend_class(backend)(target, TraceOptions()))
    session.start()
    try:
        proc.popen.stdin.write("go\n")
        proc.popen.stdin.flush()
        while not select.select([proc.popen.stdout], [], [], 0)[0]:
            session.step(0.05)
        assert proc.popen.stdout.readline().startswith("done")
        session.step(0.3)
    finally:
        session.stop()
    return session


def test_two_paths_through_one_caller_are_two_stacks(spawn, two_paths):
    proc = spawn([two_paths], stdin=subprocess.PIPE)
    session = trace_while_running(proc, "bcc")
    (raw,) = [c.totals for c in session.callers() if c.totals.symbol == "raw_map"]
    assert raw.outstanding_bytes == 200 << 16
    assert raw.count == 2200
    frames = [f.symbol for f in raw.stack.frames]
    # The stack shown is the one of the mappings still outstanding, not the first call's.
    assert "leak_path" in frames and "churn_path" not in frames, frames
