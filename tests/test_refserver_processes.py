"""`--processes api,engine`: the process started serves HTTP and never loads torch, while its engine
child holds the model and the KV cache; requests and results cross over a Unix socket and /dev/shm
rings both processes map; every leak mode lands in the child; a dead engine is reported, not hung
on; stopping leaves nothing behind."""

from __future__ import annotations

import glob
import os
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("torch").set_num_threads(1)  # as the server runs: OpenMP spins on shared cores
httpx = pytest.importorskip("httpx")

from test_refserver_leaks import class_growth, drive, settle  # noqa: E402

from leakhunt.proc.classes import RegionClass  # noqa: E402
from leakhunt.proc.sampler import Sampler  # noqa: E402
from leakhunt.proc.target import open_target  # noqa: E402
from refserver import loadgen, tokenizer  # noqa: E402
from refserver.config import EngineConfig  # noqa: E402
from refserver.engine import Engine  # noqa: E402
from refserver.launch import launch  # noqa: E402
from refserver.leaks import bytes_per_request  # noqa: E402
from refserver.sequence import SamplingParams  # noqa: E402

MiB = 2**20
RATE = 0.5
PER_REQUEST = bytes_per_request(RATE)
KV_MB = 64
#: Every mode that grows memory, at once: each request leaks PER_REQUEST through each of them.
MEMORY_LEAKS = ("mmap-hook", "shm", "pinned", "device", "pyobj")


@pytest.fixture(scope="module")
def server():
    with launch(
        leak=[*MEMORY_LEAKS, "kv-abort"],
        leak_rate=RATE,
        processes="api,engine",
        args=["--kv-cache-mb", str(KV_MB)],
    ) as s:
        yield s


def mapped_paths(pid: int) -> set[str]:
    return {
        line.split(None, 5)[5]
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
        if len(line.split(None, 5)) == 6
    }


def test_the_api_process_serves_while_the_engine_child_holds_model_and_kv_cache(server):
    health = server.health()
    engine = health["engine_process"]["pid"]
    assert health["pid"] == server.pid and health["processes"] == ["api", "engine"]
    assert server.children() == [engine]
    api_maps, engine_maps = mapped_paths(server.pid), mapped_paths(engine)
    assert not any("libtorch" in p for p in api_maps)
    assert any("libtorch_cpu" in p for p in engine_maps)
    api, eng = Sampler(open_target(server.pid)).take(), Sampler(open_target(engine)).take()
    # The KV pool is written at start: resident in the engine, absent from the API process.
    assert (
        eng.classes[RegionClass.ANON]
        >= KV_MB * MiB
        > api.classes[RegionClass.ANON] + api.classes[RegionClass.HEAP]
    )
    assert health["kv_cache"]["blocks"] * health["kv_cache"]["block_bytes"] == KV_MB * MiB
    # Both map the two rings; their names are gone from /dev/shm once both hold them.
    rings = {p for p in api_maps if p.startswith("/dev/shm/refserver-ipc-")}
    assert len(rings) == 2 and all(p.endswith("(deleted)") for p in rings)
    assert rings <= engine_maps
    assert not glob.glob(f"/dev/shm/refserver-ipc-{server.pid}-*")
    assert api.classes[RegionClass.SHM] == eng.classes[RegionClass.SHM] == 2 * MiB  # pre-faulted in both


def test_the_text_is_what_the_engine_in_one_process_writes(server):
    prompt = "the same greedy text whichever process decodes it"
    engine = Engine(EngineConfig(kv_cache_mb=KV_MB))
    engine.add_request("r", tokenizer.encode(prompt), SamplingParams(max_tokens=16, temperature=0.0))
    local = ""
    while engine.has_work():
        local += "".join(c.text for out in engine.step() for c in out.choices)
    body = httpx.post(
        server.url + "/v1/completions",
        timeout=60,
        json={"prompt": prompt, "max_tokens": 16, "temperature": 0},
    ).json()
    assert body["choices"][0]["text"] == local
    assert server.health()["engine_process"]["messages_via_shm"] > 0


def test_streaming_n_choices_and_bad_input_across_the_processes(server):
    events = []
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        timeout=60,
        json={
            "prompt": "stream",
            "max_tokens": 6,
            "n": 2,
            "seed": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and '"completion_tokens": 12' in events[-2]
    bad = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5000})
    assert bad.status_code == 400 and "maximum context length" in bad.json()["error"]["message"]


def test_every_memory_leak_lands_in_the_engine_child(server):
    engine = server.engine_pid
    api_sampler, engine_sampler = Sampler(open_target(server.pid)), Sampler(open_target(engine))
    drive(server, 20)  # warm-up: allocator caches, prefix cache
    a0, e0 = api_sampler.take(), engine_sampler.take()
    drive(server, 40, seed=1)
    a1, e1 = api_sampler.take(), engine_sampler.take()
    metrics = server.metrics()
    assert e1.classes[RegionClass.SHM] - e0.classes[RegionClass.SHM] >= 40 * PER_REQUEST  # a segment each
    native = class_growth(e0, e1, {RegionClass.ANON, RegionClass.HEAP})  # the other four
    assert 0.8 * 4 * 40 * PER_REQUEST < native < 1.5 * 4 * 40 * PER_REQUEST, native
    assert class_growth(a0, a1, set(RegionClass)) < 2 * MiB  # the API process: none of it
    for mode in MEMORY_LEAKS:
        assert metrics[f'refserver_leak_bytes_total{{mode="{mode}"}}'] >= 60 * PER_REQUEST * 0.8, mode
    # Every request's timings came back from the engine process for the latency histograms.
    assert metrics['vllm:e2e_request_latency_seconds_count{model_name="refserver-tiny"}'] >= 60
    assert len(glob.glob(f"/dev/shm/refserver-leak-{engine}-*")) >= 60
    assert not glob.glob(f"/dev/shm/refserver-leak-{server.pid}-*")


def _abandon(server, n: int) -> None:
    """n streamed requests long enough (900 tokens) to be running still when their client leaves
    after the first chunk: aborts that reach the engine however slow the client is."""
    for i in range(n):
        body = {"prompt": f"abandon {i}", "max_tokens": 900, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            next(line for line in r.iter_lines() if line.startswith("data:"))


def test_aborts_reach_the_engine_and_kv_abort_keeps_blocks_there(server):
    drive(server, 12, seed=5, abort_fraction=1.0, max_tokens=loadgen.LengthDist.parse("64"))
    # The load generator's aborts can come after the engine finished (it may run ahead of a
    # client on a busy machine); these cannot.
    _abandon(server, 4)
    health = settle(server)
    assert health["leak"]["kv-abort"]["leaked_blocks"] > 0  # half the aborts leak (rate 0.5)...
    assert 0 < health["kv_cache"]["usage"] < 1  # ...and their blocks stay taken
    # Aborts that reached the engine before it had finished the request (it may run ahead of a client).
    assert (
        server.metrics()['vllm:request_success_total{finished_reason="abort",model_name="refserver-tiny"}']
        > 0
    )


def test_a_dead_engine_process_is_reported_not_waited_for():
    with launch(processes="api,engine") as server:
        engine = server.engine_pid
        os.kill(engine, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (r := httpx.get(server.url + "/health")).status_code == 200:
            assert time.monotonic() < deadline, "the API process still says ok"
            time.sleep(0.1)
        assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
        late = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert late.status_code >= 500
        assert server.alive()


def test_disaggregated_too_the_prefill_worker_is_the_engines_child_and_stop_cleans_up():
    with launch(leak="shm", processes="api,engine", args=["--disaggregated"]) as server:
        health = server.health()
        engine, worker = health["engine_process"]["pid"], health["prefill_worker"]["pid"]
        assert server.children() == [engine]
        assert int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1]) == engine
        drive(server, 6)
        assert glob.glob(f"/dev/shm/refserver-leak-{engine}-*")
    for pid in (engine, worker):
        assert not os.path.exists(f"/proc/{pid}")
    assert not glob.glob(f"/dev/shm/refserver-leak-{engine}-*")
    assert not glob.glob(f"/dev/shm/refserver-ipc-{server.pid}-*")
