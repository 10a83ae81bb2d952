"""Each leak mode makes its own memory class grow, in step with the traffic: measured with
leakhunt's sampler on the live server (twice the requests, twice the growth) and seen by
`leakhunt watch`; --leak none stays flat under load; kv-abort keeps KV blocks until preemptions."""

from __future__ import annotations

import ctypes.util
import threading
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("httpx")

from conftest import leakhunt_json  # noqa: E402

from leakhunt.proc.classes import RegionClass  # noqa: E402
from leakhunt.proc.sampler import Sampler  # noqa: E402
from leakhunt.proc.target import open_target  # noqa: E402
from refserver import loadgen  # noqa: E402
from refserver.launch import launch  # noqa: E402
from refserver.leaks import bytes_per_request  # noqa: E402
from refserver.leaks.mmap_hook import build_library  # noqa: E402

RATE = 1.0  # 256 KiB per request: allocator noise stays a small fraction
PER_REQUEST = bytes_per_request(RATE)
SMALL_POOL = ["--kv-cache-mb", "8"]


def drive(server, requests: int, seed: int = 0, **kw) -> loadgen.LoadReport:
    shape = {
        "prompt_len": loadgen.LengthDist.parse("16-48"),
        "max_tokens": loadgen.LengthDist.parse("8"),
        **kw,
    }
    cfg = loadgen.LoadConfig(
        url=server.url, duration=None, requests=requests, concurrency=4, seed=seed, **shape
    )
    report = loadgen.run(cfg)
    assert report.failed == 0, report.errors
    return report


def settle(server, timeout: float = 20.0) -> dict:
    """/health once the server has no request left (aborts arrive after the client has gone)."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if not (
            m['vllm:num_requests_running{model_name="refserver-tiny"}']
            or m['vllm:num_requests_waiting{model_name="refserver-tiny"}']
        ):
            return server.health()
        assert time.monotonic() < deadline, "requests still in the server"
        time.sleep(0.1)


def class_growth(before, after, classes: set[RegionClass]) -> int:
    return sum(after.classes.get(c, 0) - before.classes.get(c, 0) for c in classes)


ANON = {RegionClass.ANON}
HEAP_OR_ANON = {RegionClass.ANON, RegionClass.HEAP}  # malloc: main arena or a thread's arena


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,classes,status_field",
    [
        ("mmap-hook", ANON, None),
        ("shm", {RegionClass.SHM}, "RssShmem"),
        ("pinned", ANON, "VmLck"),  # no CUDA here: locked anonymous memory
        ("device", HEAP_OR_ANON, None),  # no CUDA here: the tensors live in host memory
        ("pyobj", HEAP_OR_ANON, None),
    ],
)
def test_leak_grows_its_class_in_step_with_requests(mode, classes, status_field):
    with launch(leak=mode, leak_rate=RATE, args=SMALL_POOL) as server:
        sampler = Sampler(open_target(server.pid))
        drive(server, 40)  # warm-up: allocator caches, prefix cache
        s0 = sampler.take()
        drive(server, 40, seed=1)
        s1 = sampler.take()
        drive(server, 80, seed=2)
        s2 = sampler.take()
        info = server.health()["leak"][mode]
    first, second = class_growth(s0, s1, classes), class_growth(s1, s2, classes)
    # Each phase grows by what its requests leaked (malloc-based modes share pages with the
    # allocator's own churn: +-20%), so twice the requests grow it twice as much.
    assert 0.8 * 40 * PER_REQUEST < first < 1.35 * 40 * PER_REQUEST, (first, info)
    assert 0.8 * 80 * PER_REQUEST < second < 1.35 * 80 * PER_REQUEST, (second, info)
    assert 1.5 < second / first < 2.7
    grown = {c: s2.classes.get(c, 0) - s0.classes.get(c, 0) for c in RegionClass}
    assert max(grown, key=grown.get) in classes
    if mode == "mmap-hook":  # the events came through the real libucm's munmap hook
        assert info["hook"] == ("libucm" if ctypes.util.find_library("ucm") else "direct")
    if status_field == "VmLck" and info["kind"] != "mlocked":
        pytest.skip(f"mlock refused here ({info['mlock_error']}): the buffers are plain anonymous memory")
    if status_field:
        assert s2.status[status_field] - s0.status[status_field] >= 0.95 * 120 * PER_REQUEST


@pytest.mark.slow
@pytest.mark.parametrize(
    "fix,hook",
    [({"UCX_MEM_MMAP_HOOK_MODE": "none"}, "disabled"), ({"UCX_RCACHE_MAX_UNRELEASED": "8"}, "libucm")],
)
def test_mmap_hook_runs_through_libucm_and_the_ucx_fixes_stop_it(fix, hook):
    if not ctypes.util.find_library("ucm"):
        pytest.skip("libucm is not installed: the library raises its own events, the UCX fixes do not apply")
    with launch(leak="mmap-hook", leak_rate=RATE, args=SMALL_POOL, env=fix) as server:
        sampler = Sampler(open_target(server.pid))
        drive(server, 20)
        s0 = sampler.take()
        drive(server, 60, seed=1)
        s1 = sampler.take()
        info = server.health()["leak"]["mmap-hook"]
    assert info["hook"] == hook
    assert (info["events"] == 0) is (hook == "disabled")  # capped: events arrive, the pool is reused
    assert info["pool_bytes"] <= 12 * PER_REQUEST
    # The leak would have grown 60 x 256 KiB. What grows without it is the server's own anonymous
    # memory over 60 requests (its threads' malloc arenas, torch's caches): 2.6 MiB on some runs.
    assert class_growth(s0, s1, ANON) < 20 * PER_REQUEST


def test_native_pool_functions_are_visible_to_tracers():
    from elftools.elf.elffile import ELFFile

    with open(build_library(), "rb") as f:
        symbols = {s.name for s in ELFFile(f).get_section_by_name(".dynsym").iter_symbols()}
    assert {
        "refucm_mpool_grow",
        "refucm_mpool_get",
        "refucm_event_dispatch",
        "refucm_rcache_invalidate",
    } <= symbols


@pytest.mark.slow
def test_kv_abort_keeps_blocks_until_preemptions_start():
    args = ["--kv-cache-mb", "4", "--max-model-len", "512"]  # 128 blocks
    running = 'vllm:num_preemptions_total{model_name="refserver-tiny"}'
    burst = dict(prompt_len=loadgen.LengthDist.parse("64"), max_tokens=loadgen.LengthDist.parse("128"))
    for mode in ("none", "kv-abort"):
        with launch(leak=mode, args=args) as server:
            usage = []
            for seed in (1, 2):
                drive(server, 10, seed=seed, abort_fraction=1.0, max_tokens=loadgen.LengthDist.parse("64"))
                usage.append(settle(server)["kv_cache"]["usage"])
            before = server.metrics()[running]
            loadgen.run(loadgen.LoadConfig(url=server.url, duration=None, requests=8, concurrency=8, **burst))
            preemptions = server.metrics()[running] - before
            final = settle(server)
        if mode == "none":
            assert usage == [0.0, 0.0] and preemptions == 0  # 8 x 12 blocks fit in 128
        else:
            assert 0 < usage[0] < usage[1]  # climbs with every batch of aborts
            assert final["kv_cache"]["usage"] >= usage[1]
            assert final["leak"]["kv-abort"]["leaked_blocks"] > 0
            assert preemptions > 0


@pytest.mark.slow
def test_no_leak_mode_stays_flat_under_load():
    with launch(args=SMALL_POOL) as server:
        sampler = Sampler(open_target(server.pid))
        drive(server, 200)  # past the plateaus: prefix cache, allocator arenas
        s0 = sampler.take()
        drive(server, 400, seed=1, max_tokens=loadgen.LengthDist.parse("8-32"))
        s1 = sampler.take()
    # A leak at the tests' rate would have grown by 100 MiB here.
    assert s1.rss - s0.rss < 4 << 20, {
        c.value: s1.classes.get(c, 0) - s0.classes.get(c, 0) for c in RegionClass
    }


@pytest.mark.slow
def test_watch_sees_the_shm_leak_under_load():
    with launch(leak="shm", leak_rate=0.25, args=SMALL_POOL) as server:
        drive(server, 40)
        load = threading.Thread(
            target=loadgen.run,
            args=(
                loadgen.LoadConfig(
                    url=server.url,
                    duration=12,
                    concurrency=4,
                    prompt_len=loadgen.LengthDist.parse("16-64"),
                    max_tokens=loadgen.LengthDist.parse("8-32"),
                ),
            ),
        )
        load.start()
        try:
            verdict = leakhunt_json("watch", "--pid", server.pid, "--duration", "10s", "--interval", "0.5s")
        finally:
            load.join()
        leaked = server.metrics()['refserver_leak_bytes_total{mode="shm"}']
    assert verdict["leak"] is True, verdict["verdict"]
    assert verdict["classes"]["shm"]["leak"] is True
    growth = {c: v["rss_growth_bytes"] for c, v in verdict["classes"].items()}
    assert max(growth, key=growth.get) == "shm"
    assert 0 < verdict["classes"]["shm"]["rss_growth_bytes"] <= leaked
