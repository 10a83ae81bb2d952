"""The reference server under load while the gdb backend collects 200 stacks: not one request
fails, the stacks name the leak's native chain and the Python code above it, and the server keeps
serving once leakhunt is gone."""

from __future__ import annotations

import threading

import pytest
from test_gdb_support import collect, tracer

from leakhunt.gdb.backend import GdbBackend, gdb_extra
from leakhunt.proc.target import open_target
from leakhunt.trace.backend import TraceOptions

refserver_launch = pytest.importorskip("refserver.launch", reason="needs the refserver extra")
loadgen = pytest.importorskip("refserver.loadgen", reason="needs the refserver extra")

pytestmark = [pytest.mark.gdb, pytest.mark.slow]

STACKS = 200
REFUCM_CHAIN = ["refucm_mpool_grow", "refucm_mpool_get", "refucm_rcache_invalidate", "refucm_event_dispatch"]


class Load:
    """Closed-loop load in rounds of a few seconds until stopped: every request is accounted for."""

    def __init__(self, url: str, concurrency: int = 4) -> None:
        self.config = loadgen.LoadConfig(url=url, duration=3.0, concurrency=concurrency)
        self.reports: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.reports.append(loadgen.run(self.config))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(120)

    def total(self, field: str) -> int:
        return sum(getattr(r, field) for r in self.reports)


def test_refserver_under_load_serves_every_request_while_gdb_takes_200_stacks():
    with refserver_launch.launch(leak="mmap-hook") as server:
        backend = GdbBackend(open_target(server.pid), TraceOptions(extra=gdb_extra(max_hits=10**6)))
        with Load(server.url) as load:
            with backend:
                events = collect(
                    backend, timeout=300, until=lambda ev: sum(e.stack is not None for e in ev) >= STACKS
                )
        stacks = [e.stack for e in events if e.stack is not None]
        assert len(stacks) >= STACKS, backend.stats.notes
        assert load.total("completed") > 0
        assert load.total("failed") == 0, [r.errors for r in load.reports]
        assert backend.details()["detached"] and tracer(server.pid) == 0

        leak = [s for s in stacks if [f.symbol for f in s.frames[1:5]] == REFUCM_CHAIN]
        assert leak, "the pool's growth was not seen: " + str(stacks[0])
        if not any("Python frames unavailable" in n for n in backend.stats.notes):  # debug info for CPython
            python = [f.symbol for f in leak[0].frames if f.address == 0]
            assert "MmapHookLeak.on_request_done" in python and "Engine.step" in python

        after = loadgen.run(loadgen.LoadConfig(url=server.url, duration=2.0, concurrency=4))
        assert after.completed > 0 and after.failed == 0
        assert server.health()["status"] == "ok"
