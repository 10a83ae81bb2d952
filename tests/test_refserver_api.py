"""The reference server over real HTTP: every endpoint, streaming included, OpenAI-client
compatibility, seeded determinism, 400s for bad input, and a client disconnect that aborts its
request and returns its KV blocks."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from refserver.launch import launch  # noqa: E402


@pytest.fixture(scope="module")
def server():
    with launch(args=["--kv-cache-mb", "16"]) as s:
        yield s


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def sse_events(server, path, body):
    events = []
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def wait_for(check, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def test_health_and_models(server):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["pid"] == server.pid
    assert 2_500_000 < health["parameters"] < 4_000_000
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "refserver-tiny"


def test_completion_has_text_and_usage(server):
    body = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 7, "seed": 1}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13}


def test_prompt_as_token_ids(server):
    body = post(server, "/v1/completions", {"prompt": [256, 72, 105], "max_tokens": 3}).json()
    assert body["usage"]["prompt_tokens"] == 3


def test_seed_makes_sampling_repeatable(server):
    request = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 1.0, "seed": 1234}
    first = post(server, "/v1/completions", request).json()["choices"][0]["text"]
    again = post(server, "/v1/completions", request).json()["choices"][0]["text"]
    other = post(server, "/v1/completions", {**request, "seed": 4321}).json()["choices"][0]["text"]
    assert first == again
    assert first != other
    extreme = post(server, "/v1/completions", {"prompt": "x", "n": 2, "max_tokens": 2, "seed": -(2**63)})
    assert extreme.status_code == 200  # any int64 seed, forks included


def test_streamed_completion_matches_the_whole_one(server):
    request = {"prompt": "Stream", "max_tokens": 12, "temperature": 0.0}
    whole = post(server, "/v1/completions", request).json()["choices"][0]["text"]
    events = sse_events(
        server, "/v1/completions", {**request, "stream": True, "stream_options": {"include_usage": True}}
    )
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == whole
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 12


def test_chat_completion_and_streamed_chat(server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    body = post(
        server, "/v1/chat/completions", {"messages": messages, "max_tokens": 5, "temperature": 0}
    ).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    events = sse_events(
        server,
        "/v1/chat/completions",
        {"messages": messages, "max_tokens": 5, "temperature": 0, "stream": True},
    )
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert streamed == body["choices"][0]["message"]["content"]


def test_n_choices_and_beam_search(server):
    body = post(server, "/v1/completions", {"prompt": "fork", "n": 3, "max_tokens": 8, "seed": 5}).json()
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 24
    beams = post(
        server, "/v1/completions", {"prompt": "beam", "n": 3, "max_tokens": 8, "use_beam_search": True}
    ).json()
    assert len({c["text"] for c in beams["choices"]}) == 3


def test_stop_string_cuts_the_text(server):
    free = post(server, "/v1/completions", {"prompt": "stop", "max_tokens": 30, "temperature": 0}).json()
    text = free["choices"][0]["text"]
    stop = text[8:10]
    cut = post(
        server, "/v1/completions", {"prompt": "stop", "max_tokens": 30, "temperature": 0, "stop": [stop]}
    ).json()
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "body,fragment",
    [
        (b"{not json", "not valid JSON"),
        ({"prompt": "x", "max_tokens": 5000}, "maximum context length"),
        ({"prompt": "x", "temperature": -0.5}, "temperature"),
        ({"prompt": "x", "n": 0}, "n:"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [999999]}, "token ids"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "use_beam_search": True, "stream": True}, "beam"),
    ],
)
def test_bad_requests_get_400_with_a_json_error(server, body, fragment):
    if isinstance(body, bytes):
        r = httpx.post(
            server.url + "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
    else:
        r = post(server, "/v1/completions", body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert fragment in error["message"] and error["code"] == 400


def test_unknown_model_is_404_and_server_unharmed(server):
    r = post(server, "/v1/completions", {"prompt": "x", "model": "gpt-17"})
    assert r.status_code == 404 and "gpt-17" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_metrics_use_vllm_names(server):
    post(server, "/v1/completions", {"prompt": "metrics", "max_tokens": 4})
    m = server.metrics()
    label = '{model_name="refserver-tiny"}'
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
    ):
        assert name + label in m, name
    assert m["vllm:time_to_first_token_seconds_count" + label] >= 1
    assert m["vllm:time_per_output_token_seconds_count" + label] >= 1
    assert m["process_resident_memory_bytes"] > 0
    assert m['refserver_process_memory_bytes{kind="rss_anon"}'] > 0


def test_shared_prefix_hits_the_prefix_cache(server):
    before = server.metrics()['vllm:prefix_cache_hits_total{model_name="refserver-tiny"}']
    prompt = "a shared system prompt that is long enough to fill a few blocks " * 2
    for tail in ("one", "two"):
        post(server, "/v1/completions", {"prompt": prompt + tail, "max_tokens": 2})
    after = server.metrics()['vllm:prefix_cache_hits_total{model_name="refserver-tiny"}']
    assert after - before >= 16 * (len(prompt) // 16 - 1)


ABORTED = 'vllm:request_success_total{finished_reason="abort",model_name="refserver-tiny"}'


def test_client_disconnect_aborts_and_frees_blocks(server):
    aborted = server.metrics().get(ABORTED, 0)
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
        body = json.dumps(
            {"prompt": "disconnect " * 5, "max_tokens": 900, "stream": True, "ignore_eos": True}
        ).encode()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        received = b""
        while b"data:" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        wait_for(lambda: server.health()["kv_cache"]["usage"] > 0)
    wait_for(lambda: server.health()["kv_cache"]["usage"] == 0.0)
    m = server.metrics()
    assert m['vllm:num_requests_running{model_name="refserver-tiny"}'] == 0
    assert m[ABORTED] == aborted + 1


def test_non_streaming_client_disconnect_aborts_too(server):
    aborted = server.metrics().get(ABORTED, 0)
    with httpx.Client(timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post(
                server.url + "/v1/completions",
                json={"prompt": "gone", "max_tokens": 900, "n": 4, "ignore_eos": True},
            )
    wait_for(lambda: server.metrics().get(ABORTED, 0) == aborted + 1)
    assert server.health()["kv_cache"]["usage"] == 0.0


def test_openai_client_talks_to_the_server(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    done = client.completions.create(model="refserver-tiny", prompt="hi", max_tokens=4, seed=1)
    assert done.usage.completion_tokens == 4
    stream = client.chat.completions.create(
        model="refserver-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content) >= 1


def test_loadgen_reports_throughput_and_latency_percentiles(server):
    cp = subprocess.run(
        [
            sys.executable,
            "-m",
            "refserver.loadgen",
            "--url",
            server.url,
            "--requests",
            "12",
            "--concurrency",
            "4",
            "--prompt-len",
            "8-40",
            "--max-tokens",
            "8",
            "--abort-fraction",
            "0.25",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cp.returncode == 0, cp.stderr
    report = json.loads(cp.stdout)
    assert report["requests"] == 12 and report["failed"] == 0
    assert report["completed"] + report["aborted"] == 12 and report["aborted"] >= 1
    assert report["output_throughput"] > 0
    assert set(report["ttft_ms"]) == {"mean", "p50", "p90", "p99"} and report["tpot_ms"]["p50"] > 0
    wait_for(lambda: server.health()["kv_cache"]["usage"] == 0.0)


def test_loadgen_rejects_unbounded_load():
    cp = subprocess.run(
        [sys.executable, "-m", "refserver.loadgen", "--duration", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cp.returncode == 2 and "bounded" in cp.stderr


def test_loadgen_stopped_by_sigterm_still_reports(server):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "refserver.loadgen",
            "--url",
            server.url,
            "--duration",
            "120",
            "--concurrency",
            "2",
            "--max-tokens",
            "8",
            "--json",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    wait_for(
        lambda: (
            server.metrics().get(
                'vllm:request_success_total{finished_reason="length",model_name="refserver-tiny"}', 0
            )
            > 0
        )
    )
    time.sleep(1)
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    report = json.loads(out)
    assert proc.returncode == 0 and report["completed"] > 0
    wait_for(lambda: server.health()["kv_cache"]["usage"] == 0.0)  # its abandoned requests were aborted
