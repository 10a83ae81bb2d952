"""Disaggregated mode: the prompt is prefilled in a worker process and its KV blocks cross over
through shared memory; the decoded text is what the one-process engine produces."""

from __future__ import annotations

import glob
import os

import pytest

pytest.importorskip("torch").set_num_threads(1)  # as the server runs: OpenMP spins on shared cores
httpx = pytest.importorskip("httpx")

from refserver import loadgen, tokenizer  # noqa: E402
from refserver.config import EngineConfig  # noqa: E402
from refserver.disagg import TRANSFER_PREFIX  # noqa: E402
from refserver.engine import Engine  # noqa: E402
from refserver.launch import launch  # noqa: E402
from refserver.sequence import SamplingParams  # noqa: E402


def colocated_greedy(prompt: str, max_tokens: int) -> str:
    engine = Engine(EngineConfig())
    engine.add_request("r", tokenizer.encode(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0))
    text = ""
    while engine.has_work():
        text += "".join(c.text for out in engine.step() for c in out.choices)
    return text


@pytest.mark.slow
def test_prefill_worker_hands_kv_blocks_to_the_decoder():
    prompt = "a prompt long enough to span several KV blocks of sixteen tokens each"
    with launch(args=["--disaggregated"]) as server:
        health = server.health()
        worker = health["prefill_worker"]["pid"]
        assert health["disaggregated"] is True and worker in server.children()
        assert not glob.glob(f"/dev/shm/{TRANSFER_PREFIX}*")  # mapped by both, unlinked
        body = httpx.post(
            server.url + "/v1/completions",
            timeout=60,
            json={"prompt": prompt, "max_tokens": 20, "temperature": 0},
        ).json()
        assert body["choices"][0]["text"] == colocated_greedy(prompt, 20)
        report = loadgen.run(
            loadgen.LoadConfig(
                url=server.url,
                duration=None,
                requests=24,
                concurrency=6,
                abort_fraction=0.2,
                prompt_len=loadgen.LengthDist.parse("20-200"),
            )
        )
        assert report.failed == 0 and report.completed + report.aborted == 24
        assert server.health()["prefill_worker"]["kv_transfers"] >= 1 + report.completed
    assert not os.path.exists(f"/proc/{worker}")  # the worker went with it
