"""Growth without syscalls: investigate names the code that fills memory by its page faults.

Real processes whose RSS grows with few or no mmaps in the window: 1 GiB reserved PROT_NONE and
committed chunk by chunk, an application library (libappcache) keeping records through Debian's
jemalloc and mimalloc and through glibc's malloc, and a Python object leak (pymalloc). The right
answer is the code above the allocator, with the allocator named and its own tools advised.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import leakhunt_json, need
from test_investigate import _investigate_all

pytestmark = pytest.mark.bpf
ROOT = Path(__file__).resolve().parents[1]

SUBJECTS = {
    "reserve": ["reserve_leaker", "--rate", "4M", "--chunk", "256K"],
    # ten times the faults, all given back: in the same mapping as the records
    "churn": ["reserve_leaker", "--rate", "4M", "--chunk", "256K", "--churn", "5"],
    "glibc": ["alloc_leaker_glibc", "--rate", "4M", "--chunk", "16K"],
    "jemalloc": ["alloc_leaker_jemalloc", "--rate", "4M", "--chunk", "16K"],
    "mimalloc": ["alloc_leaker_mimalloc", "--rate", "4M", "--chunk", "16K"],
}


@pytest.fixture(scope="module")
def docs(leakers):
    for name in ("alloc_leaker_jemalloc", "alloc_leaker_mimalloc"):
        need(
            (leakers / name).exists(),
            f"{name} needs libjemalloc-dev and libmimalloc-dev (make setup installs them)",
        )
    return _investigate_all(leakers, SUBJECTS, "40s", batch=4)


def _top(doc: dict) -> dict:
    assert doc["leak"] is True, doc["verdict"]
    assert doc["explained_fraction"] >= 0.8, doc["verdict"]
    return doc["culprits"][0]


def test_reserved_then_touched_is_named_by_the_filler(docs):
    top = _top(docs["reserve"])
    assert (top["library"], top["symbol"]) == ("reserve_leaker", "lk_fill_record"), top
    assert top["evidence"] == "page faults" and top["class"] == "anon"
    assert "memset" in top["stack"][0]  # the fault is in the string routine; the culprit above it
    assert top["mapped_by"] == "before tracing" and top["filled_fraction"] > 0.9, top
    assert "mapped before tracing, " in docs["reserve"]["verdict"]


def test_pages_given_back_are_netted_out(docs):
    """lk_scratch_pass makes ten faults for each of lk_fill_record's, in the same mapping, and
    gives every page back with MADV_DONTNEED: what counts is the pages each keeps."""
    doc = docs["churn"]
    top = _top(doc)
    assert (top["library"], top["symbol"]) == ("reserve_leaker", "lk_fill_record"), top
    assert top["share"] >= 0.8 and top["filled_fraction"] >= 0.8, top
    scratch = [c for c in doc["culprits"] if c["symbol"] == "lk_scratch_pass"]
    assert not scratch or scratch[0]["share"] < 0.1, scratch


@pytest.mark.parametrize(
    "allocator, known", [("glibc", "glibc-malloc"), ("jemalloc", "jemalloc"), ("mimalloc", "mimalloc")]
)
def test_the_caller_above_the_allocator(docs, allocator, known):
    top = _top(docs[allocator])
    assert (top["library"], top["symbol"]) == ("libappcache.so", "appcache_put"), top
    assert top["evidence"] == "page faults" and top["known"]["id"] == known
    assert f"allocator {'glibc malloc' if allocator == 'glibc' else allocator}" in top["detail"]
    assert "libappcache.so's appcache_put" in docs[allocator]["verdict"]


def test_python_objects_point_at_the_python_heap(spawn):
    p = spawn([sys.executable, ROOT / "fixtures/leakers/pyobj_leaker.py", "--rate", "4M"])

    doc = leakhunt_json("investigate", "--pid", p.pid, "--duration", "40s", "--no-gdb-stacks")
    assert doc["leak"] is True, doc["verdict"]
    top = doc["culprits"][0]
    assert top["symbol"] == "Python objects (pymalloc)" and top["known"]["id"] == "python-heap", top
    assert any("memray" in r for r in top["remedies"])
    assert doc["explained_fraction"] >= 0.7, doc["verdict"]


def test_trace_mmap_faults_shows_who_fills_memory(leakers, spawn):
    p = spawn([leakers / "alloc_leaker_jemalloc", "--rate", "4M", "--chunk", "16K"])
    doc = leakhunt_json("trace-mmap", "--pid", p.pid, "--duration", "8s", "--faults")
    faults = doc["faults"]
    top = faults["by_caller"][0]
    assert faults["seen"] > 1000 and (top["library"], top["symbol"]) == ("libappcache.so", "appcache_put")
    assert top["allocators"] == ["jemalloc"] and top["bytes"] > 4 * 2**20
    assert any("libjemalloc" in f for f in top["stack"])


def test_bpftrace_counts_faults_as_far_as_it_can(leakers, spawn):
    """The bpftrace source: counts and exemplars in the kernel, no netting, and it says so."""
    p = spawn([leakers / "reserve_leaker", "--rate", "4M", "--chunk", "256K"])
    trace = leakhunt_json(
        "trace-mmap", "--pid", p.pid, "--duration", "6s", "--faults", "--backend", "bpftrace"
    )
    top = trace["faults"]["by_caller"][0]
    assert (top["library"], top["symbol"]) == ("reserve_leaker", "lk_fill_record"), top
    assert top["bytes"] > 8 * 2**20 and trace["faults"]["given_back_pages"] is None

    doc = leakhunt_json("investigate", "--pid", p.pid, "--duration", "40s", "--backend", "bpftrace")
    top = _top(doc)
    assert (top["library"], top["symbol"]) == ("reserve_leaker", "lk_fill_record"), top
    assert "not netted out: bpftrace" in top["detail"] and top["mapped_by"] == "before tracing"


def test_the_allocator_that_mapped_a_bucket_is_found_by_address():
    """MappedBy: a held mapping whose stack goes through an allocator names it for every 2 MiB
    bucket it overlaps, partly or whole, in its own pid only; other mappings name nothing."""
    from leakhunt.trace.events import Frame, Stack
    from leakhunt.trace.faults import MappedBy

    je = Stack(
        (
            Frame(0x1000, "/usr/lib/libc.so.6", "mmap64"),
            Frame(0x2000, "/usr/lib/libjemalloc.so.2", "je_pages_map"),
        )
    )
    app = Stack((Frame(0x3000, "/srv/app", "main"),))
    mb = 1 << 20
    mapped = MappedBy([(7, 3 * mb, 9 * mb, je), (7, 20 * mb, 22 * mb, app), (8, 40 * mb, 41 * mb, je)])
    assert [mapped.bucket(7, b) is not None for b in range(6)] == [False, True, True, True, True, False]
    assert mapped.bucket(7, 1)[0] == "jemalloc" and mapped.bucket(7, 1)[1] is je
    assert mapped.bucket(7, 10) is None  # held, but mapped by the application itself
    assert mapped.bucket(8, 20) is not None and mapped.bucket(9, 20) is None
