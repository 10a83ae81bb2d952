"""The checks `make gpu-check` runs against the reference server: each starts a real server (on
CUDA on the GPU machine), drives it with the real load generator, runs the real `leakhunt`
commands against it and compares what they say with what the server knows it leaked.

Every check returns an Outcome; none raises for a failed expectation. A check that cannot run
here (no NVML, no cuda-gdb) is skipped with its reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

#: The bar of the issue: leakhunt's slope of the leaking class within this of the rate the server leaked.
SLOPE_TOLERANCE = 0.20
#: Device tensors and pinned buffers per request, in units of 256 KiB (--leak-rate): multiples of
#: 2 MiB, the granularity of the driver's pinned mappings and of torch's device segments.
PINNED_RATE, DEVICE_RATE = 8.0, 32.0


@dataclass(frozen=True)
class Setup:
    python: str  # the interpreter that has torch (the GPU image's python3)
    env: dict  # environment of every child: PYTHONPATH with the carried wheels and leakhunt
    device: str  # cuda | cpu
    out: Path  # recordings, logs, JSON documents
    duration: float  # seconds each watch runs
    warmup: float  # seconds of load before a watch starts


@dataclass
class Outcome:
    name: str
    bar: bool  # one of the bars: its failure fails gpu-check
    status: str  # pass | fail | skip
    detail: str
    data: dict = field(default_factory=dict)


def outcome(name: str, bar: bool, ok: bool, detail: str, **data) -> Outcome:
    return Outcome(name, bar, "pass" if ok else "fail", detail, data)


def skipped(name: str, bar: bool, why: str) -> Outcome:
    return Outcome(name, bar, "skip", why)


def leakhunt(setup: Setup, *args, timeout: float) -> dict:
    """The real CLI with --json; its document, or {"error": ...} with the tail of its stderr."""
    cp = subprocess.run(
        [setup.python, "-m", "leakhunt", *map(str, args), "--json"],
        capture_output=True,
        text=True,
        env=setup.env,
        timeout=timeout,
    )
    try:
        return json.loads(cp.stdout)
    except ValueError:
        return {"error": f"leakhunt {args[0]} exited {cp.returncode}: {cp.stderr.strip()[-600:]}"}


def _server_args(setup: Setup, extra: tuple[str, ...] = ()) -> list[str]:
    # No prefix cache: its map of block hashes grows until the pool has cycled once, a plateau that a
    # short window would take for a leak. The leaks under test are per request, whatever the cache.
    return ["--device", setup.device, "--max-num-seqs", "64", "--no-prefix-caching", *extra]


class Load:
    """The load generator in the background, for longer than any watch; stopped by SIGTERM, after
    which it still prints its JSON report."""

    def __init__(self, setup: Setup, url: str, seconds: float, args: tuple[str, ...]) -> None:
        self.popen = subprocess.Popen(
            [
                setup.python,
                "-m",
                "refserver.loadgen",
                "--url",
                url,
                "--duration",
                str(int(seconds)),
                "--json",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=setup.env,
        )

    def finish(self) -> dict:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            out, err = self.popen.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            out, err = self.popen.communicate()
        try:
            return json.loads(out)
        except ValueError:
            return {"error": f"loadgen exited {self.popen.returncode}: {err.strip()[-600:]}"}


@dataclass
class Observation:
    watch: dict
    leaked_rate: float  # bytes/s the server counted for the leak mode during the watch
    load: dict
    metrics_after: dict  # the server's /metrics once the load stopped
    recording: Path
    settled_s: float | None  # how long the load ran before RSS was steady (None: not waited for)


def _leaked(server, mode: str | None) -> float:
    if not mode:
        return 0.0
    return server.metrics().get(f'refserver_leak_bytes_total{{mode="{mode}"}}', 0.0)


#: A server under load settles when its RSS stayed within SETTLE_BAND for SETTLE_SPAN seconds: the
#: allocator's thread arenas and Python's pools fill in steps for the first half minute or so, and
#: on an AVX-512 Xeon MKL's sgemm keeps a buffer per new shape: a 15 s span once let a 0.5 MiB
#: step land in a 10 s watch of the no-leak server.
SETTLE_BAND, SETTLE_SPAN, SETTLE_MAX = 256 << 10, 25.0, 90.0


def _vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def settle(pid: int, at_least: float, at_most: float) -> float:
    """Wait at least ``at_least`` seconds, then until RSS is steady (or ``at_most`` passed): a
    verdict of no leak must not rest on a window that caught the start-up's last steps."""
    began = time.monotonic()
    seen: list[tuple[float, int]] = []
    while (now := time.monotonic() - began) < at_most:
        seen = [(t, r) for t, r in seen if t >= now - SETTLE_SPAN] + [(now, _vm_rss(pid))]
        if now >= at_least and seen[-1][0] - seen[0][0] >= SETTLE_SPAN - 1.5:
            if max(r for _, r in seen) - min(r for _, r in seen) <= SETTLE_BAND:
                break
        time.sleep(1.0)
    return time.monotonic() - began


def observe(
    setup: Setup,
    name: str,
    mode: str | None,
    rate: float | None,
    load_args: tuple[str, ...],
    server_extra: tuple[str, ...] = (),
    steady_rss: bool = False,
) -> Observation:
    """Start the server with a leak mode, put it under load, watch it, stop everything.
    ``steady_rss``: the leak does not grow RSS, so the watch starts once RSS has settled."""
    from refserver.launch import launch

    recording = setup.out / f"watch-{name}"
    shutil.rmtree(recording, ignore_errors=True)
    with launch(
        leak=mode,
        leak_rate=rate,
        args=_server_args(setup, server_extra),
        env=setup.env,
        python=setup.python,
        timeout=300,
    ) as server:
        load = Load(setup, server.url, setup.warmup + SETTLE_MAX + setup.duration + 30, load_args)
        try:
            # The first requests compile kernels and fill allocator caches.
            waited = settle(server.pid, setup.warmup, setup.warmup + SETTLE_MAX) if steady_rss else None
            if not steady_rss:
                time.sleep(setup.warmup)
            before, t0 = _leaked(server, mode), time.monotonic()
            watch = leakhunt(
                setup,
                "watch",
                "--pid",
                server.pid,
                "--interval",
                "1s",
                "--duration",
                f"{setup.duration}s",
                "--warmup",
                "3s",
                "--record",
                recording,
                timeout=setup.duration + 120,
            )
            after, t1 = _leaked(server, mode), time.monotonic()
        finally:
            report = load.finish()
        time.sleep(1.0)  # aborted streams reach the engine
        metrics = server.metrics()
    (setup.out / f"watch-{name}.json").write_text(json.dumps(watch, indent=1))
    return Observation(watch, (after - before) / (t1 - t0), report, metrics, recording, waited)


def _top_class(watch: dict) -> str | None:
    growth = {k: c.get("rss_growth_bytes", 0) for k, c in watch.get("classes", {}).items()}
    best = max(growth, key=growth.get, default=None)
    return best if best is not None and growth[best] > 0 else None


def _load_problem(obs: Observation) -> str | None:
    if "error" in obs.watch:
        return obs.watch["error"]
    if "error" in obs.load or not obs.load.get("completed", 0):
        return f"the load did not run: {obs.load.get('error') or obs.load.get('errors')}"
    return None


def _mib_min(bytes_per_s: float | None) -> str:
    return "n/a" if bytes_per_s is None else f"{bytes_per_s * 60 / 2**20:+.1f} MiB/min"


API_CHECK = """
import json, sys
url = sys.argv[1]
from openai import OpenAI
client = OpenAI(base_url=url + "/v1", api_key="none")
done = client.completions.create(model="refserver-tiny", prompt="Hello", max_tokens=8, seed=1)
chunks = list(client.chat.completions.create(model="refserver-tiny", stream=True, max_tokens=8, seed=1,
                                             messages=[{"role": "user", "content": "Hi"}]))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
print(json.dumps({"completion_tokens": done.usage.completion_tokens, "chunks": len(chunks), "chat_text": text}))
"""


def check_api(setup: Setup) -> Outcome:
    """The server answers completions and streamed chat (through the openai client) on the device,
    with the Triton decode kernel when on CUDA."""
    from refserver.launch import launch

    with launch(args=_server_args(setup), env=setup.env, python=setup.python, timeout=300) as server:
        health = server.health()
        cp = subprocess.run(
            [setup.python, "-c", API_CHECK, server.url],
            capture_output=True,
            text=True,
            env=setup.env,
            timeout=120,
        )
    want = ("cuda", "triton") if setup.device == "cuda" else ("cpu", "torch")
    got = (str(health.get("device", "")).split(":")[0], health.get("attention"))
    if cp.returncode != 0:
        return outcome("api on the device", True, False, f"openai client failed: {cp.stderr.strip()[-600:]}")
    answer = json.loads(cp.stdout)
    ok = got == want and answer["completion_tokens"] == 8 and answer["chunks"] > 1
    return outcome(
        "api on the device",
        True,
        ok,
        f"device {health.get('device')}, attention {health.get('attention')} (want {'/'.join(want)}); "
        f"completion of {answer['completion_tokens']} tokens, streamed chat in {answer['chunks']} chunks",
        **answer,
    )


def check_none(setup: Setup) -> Outcome:
    obs = observe(
        setup,
        "none",
        None,
        None,
        ("--rate", "10", "--concurrency", "32", "--max-tokens", "16"),
        steady_rss=True,
    )
    if problem := _load_problem(obs):
        return outcome("leak none", True, False, problem)
    w = obs.watch
    device = w.get("device_memory", {})
    ok = not w["leak"] and not device.get("leak", False)
    return outcome(
        "leak none",
        True,
        ok,
        f"leak {str(w['leak']).lower()} ({w['verdict']}); device memory "
        f"leak {str(device.get('leak', 'n/a')).lower()}; {obs.load['completed']} requests, RSS steady "
        f"after {obs.settled_s:.0f}s of load",
        watch_leak=w["leak"],
        device_leak=device.get("leak"),
    )


def check_pinned(setup: Setup) -> Outcome:
    """The vllm#48165 pattern: a pinned staging buffer per request. leakhunt must say leak, name the
    pinned class (mlocked anonymous memory on a CPU: the same code path, another class), and put
    its slope within 20% of what the server leaked."""
    obs = observe(
        setup, "pinned", "pinned", PINNED_RATE, ("--rate", "10", "--concurrency", "32", "--max-tokens", "16")
    )
    if problem := _load_problem(obs):
        return outcome("leak pinned", True, False, problem)
    w, expected = obs.watch, "pinned" if setup.device == "cuda" else "anon"
    top = _top_class(w)
    slope = w.get("classes", {}).get(top or expected, {}).get("slope_bytes_per_s")
    error = abs(slope / obs.leaked_rate - 1) if slope and obs.leaked_rate > 0 else float("inf")
    ok = w["leak"] and top == expected and error <= SLOPE_TOLERANCE
    return outcome(
        "leak pinned",
        True,
        ok,
        f"leak {str(w['leak']).lower()}, top class {top} (want {expected}), its slope "
        f"{_mib_min(slope)} vs {_mib_min(obs.leaked_rate)} leaked ({error:.0%} off, bar "
        f"{SLOPE_TOLERANCE:.0%}); RSS {_mib_min(w.get('rss_slope_bytes_per_s'))}",
        top_class=top,
        slope=slope,
        leaked_rate=obs.leaked_rate,
        relative_error=error,
    )


def check_device(setup: Setup) -> Outcome:
    """Tensors kept per request on the GPU: NVML's series says leak, smaps' RSS does not."""
    if setup.device != "cuda":
        return skipped("leak device", True, "needs CUDA and NVML")
    obs = observe(
        setup,
        "device",
        "device",
        DEVICE_RATE,
        ("--rate", "4", "--concurrency", "16", "--max-tokens", "16"),
        steady_rss=True,
    )
    if problem := _load_problem(obs):
        return outcome("leak device", True, False, problem)
    w, d = obs.watch, obs.watch.get("device_memory", {})
    if not d.get("available"):
        return outcome("leak device", True, False, f"no device series: {d.get('reason')}")
    ratio = d["slope_bytes_per_s"] / obs.leaked_rate if obs.leaked_rate > 0 else float("nan")
    ok = d["leak"] and not w["leak"]
    return outcome(
        "leak device",
        True,
        ok,
        f"device memory leak {str(d['leak']).lower()} {_mib_min(d['slope_bytes_per_s'])} "
        f"({ratio:.2f}x the {_mib_min(obs.leaked_rate)} leaked), RSS leak {str(w['leak']).lower()} "
        f"({w['verdict']})",
        device_slope=d["slope_bytes_per_s"],
        leaked_rate=obs.leaked_rate,
        rss_leak=w["leak"],
        recording=str(obs.recording),
    )


def check_kv_abort(setup: Setup) -> Outcome:
    """Blocks of aborted requests never return: KV usage stays up after the load, RSS and device
    memory stay flat (the pool is allocated up front)."""
    obs = observe(
        setup,
        "kv-abort",
        "kv-abort",
        1.0,
        ("--rate", "10", "--concurrency", "32", "--max-tokens", "64", "--abort-fraction", "0.3"),
        server_extra=("--kv-cache-mb", "8"),
        steady_rss=True,
    )
    if problem := _load_problem(obs):
        return outcome("leak kv-abort", False, False, problem)
    usage = obs.metrics_after.get('vllm:kv_cache_usage_perc{model_name="refserver-tiny"}', 0.0)
    preempt = obs.metrics_after.get('vllm:num_preemptions_total{model_name="refserver-tiny"}', 0.0)
    w = obs.watch
    ok = usage > 0.05 and not w["leak"] and not w.get("device_memory", {}).get("leak", False)
    return outcome(
        "leak kv-abort",
        False,
        ok,
        f"KV usage {usage:.0%} after the load stopped (baseline 0%), {preempt:.0f} preemptions, "
        f"{obs.load.get('aborted', 0)} aborts; RSS leak {str(w['leak']).lower()}",
        kv_usage_after=usage,
        preemptions=preempt,
    )


def check_report(setup: Setup, recording: str | None) -> Outcome:
    """The device recording renders with its Device memory section (report's code on real NVML data)."""
    if not recording:
        return skipped("report device section", False, "no device recording")
    doc = leakhunt(setup, "report", recording, "--html", Path(recording) / "report.html", timeout=180)
    ok = "Device memory" in doc.get("sections", []) and doc.get("verdict") == "device_leak"
    return outcome(
        "report device section",
        False,
        ok,
        f"verdict {doc.get('verdict')}; sections {', '.join(doc.get('sections', [])) or doc.get('error')}",
    )


def _cuda_gdb() -> str | None:
    return shutil.which("cuda-gdb") or next(
        (p for p in ("/usr/local/cuda/bin/cuda-gdb",) if os.path.exists(p)), None
    )


def check_callers(setup: Setup) -> Outcome:
    """Callers past the driver: cuda-gdb drives the gdb backend on the pinned leak; the memory
    still mapped must be held by the CUDA libraries the known culprit names."""
    gdb = _cuda_gdb()
    if setup.device != "cuda" or gdb is None:
        return skipped("pinned callers (cuda-gdb)", False, "needs CUDA and cuda-gdb")
    from fnmatch import fnmatchcase

    from leakhunt.analysis.culprits import known_culprits

    patterns = next(c for c in known_culprits() if c.id == "cuda-pinned-host").module
    from refserver.launch import launch

    with launch(
        leak="pinned",
        leak_rate=PINNED_RATE,
        args=_server_args(setup),
        env=setup.env,
        python=setup.python,
        timeout=300,
    ) as server:
        load = Load(
            setup, server.url, setup.warmup + 90, ("--rate", "5", "--concurrency", "8", "--max-tokens", "8")
        )
        try:
            time.sleep(setup.warmup)
            doc = leakhunt(
                setup,
                "trace-mmap",
                "--pid",
                server.pid,
                "--backend",
                "gdb",
                "--gdb-path",
                gdb,
                "--no-gdb-python-frames",
                "--gdb-max-hits",
                "400",
                "--duration",
                "25s",
                timeout=240,
            )
        finally:
            load.finish()
        alive = server.alive()
    (setup.out / "trace-pinned.json").write_text(json.dumps(doc, indent=1))
    if "error" in doc:
        return outcome("pinned callers (cuda-gdb)", False, False, doc["error"])
    callers = [c for c in doc.get("by_caller", []) if c.get("outstanding_bytes")]
    cuda = [
        c
        for c in callers
        if any(
            fnmatchcase(lib, p)
            for p in patterns
            for lib in [c["library"]] + [f.split("!")[0] for f in c["stack"]]
        )
    ]
    top = callers[0]["caller"] if callers else "nothing outstanding"
    ok = bool(cuda) and cuda[0] is callers[0] and alive
    return outcome(
        "pinned callers (cuda-gdb)",
        False,
        ok,
        f"top caller {top}; {len(cuda)} of {len(callers)} outstanding callers in "
        f"{'/'.join(patterns)}; {doc.get('events')} calls; server alive after: {alive}",
    )


KERNEL_CHECK = """
import torch
from refserver.attention import build_metadata, paged_attention
from refserver import triton_attention
gen = torch.Generator().manual_seed(0)
bf16 = dict(dtype=torch.bfloat16, device="cuda")
kc, vc = torch.randn(512, 16, 2, 32, generator=gen).to(**bf16), torch.randn(512, 16, 2, 32, generator=gen).to(**bf16)
lengths = [1, 5, 16, 17, 37, 100, 250, 500]
order = torch.randperm(512, generator=gen).tolist()
tables = []
for n in lengths:
    tables.append(order[:-(-n // 16)]); order = order[-(-n // 16):]
meta = build_metadata(tables, lengths, [1] * len(lengths), 16, "cuda")
q = torch.randn(len(lengths), 8, 32, generator=gen).to(**bf16)
ref = paged_attention(q.float(), kc.float(), vc.float(), meta, 32 ** -0.5)
outs, rows = [], []
for g in meta.decodes:   # lengths this far apart make several decode groups
    r = g.rows.tolist() if g.rows is not None else list(range(len(lengths)))
    outs.append(triton_attention.paged_decode(q[r], kc, vc, g.block_tables, g.context_lens, 32 ** -0.5))
    rows += r
print("groups", len(meta.decodes), "max_abs_diff", (ref[rows] - torch.cat(outs).float()).abs().max().item())
"""
#: bf16 K/V and queries against an fp32 reference: bf16 keeps 8 bits of mantissa.
KERNEL_TOLERANCE = 2e-2


def check_kernel(setup: Setup) -> Outcome:
    if setup.device != "cuda":
        return skipped("triton kernel on the GPU", True, "needs CUDA (CI checks it under TRITON_INTERPRET=1)")
    cp = subprocess.run(
        [setup.python, "-c", KERNEL_CHECK], capture_output=True, text=True, env=setup.env, timeout=300
    )
    if cp.returncode != 0 or "max_abs_diff" not in cp.stdout:
        return outcome(
            "triton kernel on the GPU", True, False, f"exit {cp.returncode}: {cp.stderr.strip()[-600:]}"
        )
    diff = float(cp.stdout.split("max_abs_diff")[1])
    return outcome(
        "triton kernel on the GPU",
        True,
        diff <= KERNEL_TOLERANCE,
        f"max |Triton - torch fp32| {diff:.1e} (tolerance {KERNEL_TOLERANCE:g}, bf16)",
        max_abs_diff=diff,
    )
