"""`leakhunt demo`: the whole story on a real server, with no arguments.

Starts the paged-attention reference server with a planted leak (default: the libucm-style
mmap-hook pool), drives it with the load generator, investigates it, writes the post-mortem
report, and stops everything it started, whatever happens (Ctrl-C included).

By default the server runs as production servers do, as several processes (vLLM v1's shape): the
pid the demo is given serves HTTP, the leak lives in its engine child, and the investigation
follows the tree to name the child. ``processes="api"`` runs the one-process server instead.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from leakhunt.errors import BadInput, LeakhuntError
from leakhunt.investigate import InvestigateOptions, Investigation, InvestigationResult
from leakhunt.proc.target import open_target
from leakhunt.record import SessionWriter

LEAK_MODES = ("mmap-hook", "shm", "handoff", "kv-abort", "pinned", "device", "pyobj", "none")
PROCESS_LAYOUTS = ("api,engine", "api")
#: Each finished request leaks leak_rate x 256 KiB; at the few requests per second this CPU serves
#: that is tens of MiB/min: decided within the minute, small enough to leave the machine alone.
DEFAULT_LEAK_RATE = 1.0
LOAD_CONCURRENCY = 4
WARMUP_REQUESTS = 200
WARMUP_TIMEOUT_S = 90.0
#: kv-abort leaks the KV blocks of aborted requests: the load abandons this share of them.
ABORT_FRACTION = 0.3
KV_USAGE = 'vllm:kv_cache_usage_perc{model_name="refserver-tiny"}'
PREEMPTIONS = 'vllm:num_preemptions_total{model_name="refserver-tiny"}'


@dataclass
class DemoResult:
    leak: str
    out: Path
    investigation: InvestigationResult
    load: dict | None
    html: Path
    markdown: Path
    server_pid: int
    server_url: str
    processes: str = "api"
    engine_pid: int | None = None
    server_metrics: dict | None = None  # the server's own view of its KV pool, before and after

    @property
    def culprit_pid(self) -> int | None:
        culprits = self.investigation.attribution.culprits if self.investigation.leak else []
        return culprits[0].pid if culprits else None

    def pool_sentence(self) -> str | None:
        """kv-abort: what the server's own metrics say, since memory evidence cannot see it."""
        m = self.server_metrics
        if not m:
            return None
        return (
            f"the server's own metrics: KV-cache usage {m['kv_usage_before']:.0%} -> {m['kv_usage_after']:.0%} "
            f"with no request running, {m['leaked_blocks']} KV blocks never returned, preemptions "
            f"+{m['preemptions']:.0f}. This leak is inside a pool allocated (and resident) from the start: "
            "no memory grows, so no memory evidence can name it; the application's own pool metrics do."
        )

    def to_json(self) -> dict:
        return {
            "leak_mode": self.leak,
            "processes": self.processes,
            "server_pid": self.server_pid,
            "engine_pid": self.engine_pid,
            "culprit_pid": self.culprit_pid,
            "found_in_child": self.culprit_pid is not None and self.culprit_pid != self.server_pid,
            "server_url": self.server_url,
            "server_metrics": self.server_metrics,
            "pool_leak": self.pool_sentence(),
            "record": str(self.out / "recording"),
            "html": str(self.html),
            "markdown": str(self.markdown),
            "load": self.load,
            "investigation": self.investigation.to_json(),
        }


def require_refserver() -> None:
    missing = [m for m in ("refserver", "torch", "fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise BadInput(
            f"leakhunt demo needs the reference server's extra ({', '.join(missing)} missing): "
            "pip install torch==2.13.0 && pip install 'leakhunt[refserver]'"
        )


def run_demo(
    leak: str,
    out: Path,
    duration: float,
    leak_rate: float = DEFAULT_LEAK_RATE,
    progress: Callable[[str], None] = lambda step: None,
    on_update: Callable | None = None,
    processes: str = "api,engine",
) -> DemoResult:
    require_refserver()
    from refserver.launch import LaunchError, launch  # the refserver extra: imported only here

    out.mkdir(parents=True, exist_ok=True)
    recording = out / "recording"
    if (recording / "session.json").exists():
        shutil.rmtree(recording)  # the previous demo's: a recording is one run, not two appended
    tree = processes != "api"
    progress(
        f"starting the reference server ({'an API process and an engine process' if tree else 'one process'}, "
        f"leak: {leak})"
    )
    try:
        server = launch(leak=None if leak == "none" else [leak], leak_rate=leak_rate, processes=processes)
    except LaunchError as e:
        raise LeakhuntError(f"the reference server did not start: {e}") from None
    load = pool = None
    engine_pid = server.pid
    try:
        engine_pid = server.engine_pid
        before = server.metrics() if leak == "kv-abort" else None
        abort = ["--abort-fraction", str(ABORT_FRACTION)] if leak == "kv-abort" else []
        progress(
            f"driving load ({LOAD_CONCURRENCY} concurrent clients{', some abandoning' if abort else ''}) "
            f"at {server.url}"
        )
        loadgen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "refserver.loadgen",
                "--url",
                server.url,
                "--duration",
                str(duration + WARMUP_TIMEOUT_S + 30),
                "--concurrency",
                str(LOAD_CONCURRENCY),
                "--json",
                *abort,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            # Past the server's start-up plateaus (allocator caches, the prefix cache filling) before
            # the baseline sample: a number of requests served, however fast this machine is.
            progress(f"warming up ({WARMUP_REQUESTS} requests)")
            if not server.wait_served(WARMUP_REQUESTS, timeout=WARMUP_TIMEOUT_S):
                raise LeakhuntError(
                    f"the reference server served fewer than {WARMUP_REQUESTS} requests in "
                    f"{WARMUP_TIMEOUT_S:.0f}s: {server.log_tail(3) or 'no log'}"
                )
            target = open_target(server.pid)
            progress(f"investigating pid {server.pid}" + (" and its subprocesses" if tree else ""))
            writer = SessionWriter(
                recording,
                "demo",
                {
                    "pid": server.pid,
                    "cmdline": target.cmdline,
                    "leak_mode": leak,
                    "server_url": server.url,
                    "subprocesses": tree,
                },
            )
            investigation = Investigation(
                target, InvestigateOptions(duration=duration, subprocesses=tree), writer, on_update
            )
            result = investigation.run()
        finally:
            loadgen.terminate()
            try:
                stdout, _ = loadgen.communicate(timeout=20)
                load = json.loads(stdout) if stdout.strip() else None
            except (subprocess.TimeoutExpired, ValueError):
                loadgen.kill()
                loadgen.wait()
        if before is not None:
            pool = _pool_evidence(server, before)
        document = {"command": "demo", "leak_mode": leak, **result.to_json()}
        if pool:
            document["server_metrics"] = pool
        writer.finish(document)
    finally:
        progress("stopping the reference server")
        server.stop()
    progress("writing the report")
    html, markdown = write_report(recording, out)
    return DemoResult(
        leak, out, result, load, html, markdown, server.pid, server.url, processes, engine_pid, pool
    )


def _pool_evidence(server, before: dict, settle_s: float = 10.0) -> dict | None:
    """KV usage before the load and once no request is left (aborts land after their clients left)."""
    deadline = time.monotonic() + settle_s
    try:
        while True:
            after = server.metrics()
            running = after.get('vllm:num_requests_running{model_name="refserver-tiny"}', 0)
            if not running or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        leaked = server.health().get("leak", {}).get("kv-abort", {}).get("leaked_blocks", 0)
    except OSError:
        return None
    return {
        "kv_usage_before": before.get(KV_USAGE, 0.0),
        "kv_usage_after": after.get(KV_USAGE, 0.0),
        "leaked_blocks": leaked,
        "preemptions": after.get(PREEMPTIONS, 0.0) - before.get(PREEMPTIONS, 0.0),
    }


def write_report(recording: Path, out: Path) -> tuple[Path, Path]:
    from leakhunt.report.build import build_report
    from leakhunt.report.html import render_html
    from leakhunt.report.markdown import render_markdown
    from leakhunt.report.recorded import load

    report = build_report(load(recording))
    html, markdown = out / "report.html", out / "report.md"
    html.write_text(render_html(report))
    markdown.write_text(render_markdown(report, markdown))
    return html, markdown
