"""The bar on the reference server: in mmap-hook leak mode, under load, both backends name the
native pool that grows behind libucm's munmap hook first, with at least 95% of what is held."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("refserver")

from leakhunt.proc.target import open_target  # noqa: E402
from leakhunt.trace.backend import TraceOptions, backend_class  # noqa: E402
from leakhunt.trace.session import TraceSession  # noqa: E402
from refserver import loadgen  # noqa: E402
from refserver.launch import launch  # noqa: E402

pytestmark = pytest.mark.bpf
#: Batches of 8 requests replayed before tracing; the load replays them from the first.
WARM_BATCHES = 16


def drive(url: str, requests: int, seed: int, concurrency: int = 4) -> None:
    cfg = loadgen.LoadConfig(
        url=url,
        duration=None,
        requests=requests,
        concurrency=concurrency,
        seed=seed,
        prompt_len=loadgen.LengthDist.parse("16-48"),
        max_tokens=loadgen.LengthDist.parse("8"),
    )
    report = loadgen.run(cfg)
    assert report.failed == 0, report.errors


@pytest.fixture(scope="module")
def server():
    with launch(leak="mmap-hook", leak_rate=1.0, args=["--kv-cache-mb", "8"]) as srv:
        # Warm-up: allocator caches, the prefix cache, the library's first chunk, and the buffer
        # MKL's sgemm keeps in each thread that runs a big enough batch (5.7 MiB each, kept for
        # good, on an AVX-512 Xeon: wide batches first), then the very batches the load replays.
        drive(srv.url, 20, 0)
        drive(srv.url, 64, 0, concurrency=16)
        for seed in range(1, WARM_BATCHES + 1):
            drive(srv.url, 8, seed)
        yield srv


@pytest.mark.parametrize("backend", ["bcc", "bpftrace"])
def test_the_hooked_pool_is_named_first_while_the_server_serves(server, backend):
    stop = threading.Event()
    served = []

    def load() -> None:
        seed = 1
        while not stop.is_set():
            drive(server.url, 8, seed)
            served.append(8)
            seed = seed % WARM_BATCHES + 1

    target = open_target(server.pid)
    session = TraceSession(target, backend_class(backend)(target, TraceOptions()))
    session.start()
    loader = threading.Thread(target=load)
    loader.start()
    try:
        session.run(4.0)
    finally:
        stop.set()
        loader.join()
    assert sum(served) >= 8 and server.alive()
    callers = [c.totals for c in session.callers()]
    total = sum(c.outstanding_bytes for c in callers)
    top = callers[0]
    assert top.library.startswith("librefucm") and top.symbol == "refucm_mpool_grow", [
        c.label for c in callers
    ]
    assert top.outstanding_bytes >= 0.95 * total > 0, [(c.label, c.outstanding_bytes) for c in callers]
    chain = [f.symbol for f in top.stack.frames]
    for frame in ("refucm_mpool_get", "refucm_rcache_invalidate", "ucm_munmap"):
        assert frame in chain, chain
    assert any("libucm" in note for note in session.backend.stats.notes)
    assert session.backend.stats.lost_events == 0
