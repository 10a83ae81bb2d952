"""`leakhunt demo`: the whole story on a real server, with no arguments.

Starts the paged-attention reference server with a planted leak (default: the libucm-style
mmap-hook pool), drives it with the load generator, investigates it, writes the post-mortem
report, and stops everything it started, whatever happens (Ctrl-C included).
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

LEAK_MODES = ("mmap-hook", "shm", "kv-abort", "pinned", "device", "pyobj", "none")
#: Each finished request leaks leak_rate x 256 KiB; at the few requests per second this CPU serves
#: that is tens of MiB/min: decided within the minute, small enough to leave the machine alone.
DEFAULT_LEAK_RATE = 1.0
LOAD_CONCURRENCY = 4


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

    def to_json(self) -> dict:
        return {"leak_mode": self.leak, "server_pid": self.server_pid, "server_url": self.server_url,
                "record": str(self.out / "recording"), "html": str(self.html), "markdown": str(self.markdown),
                "load": self.load, "investigation": self.investigation.to_json()}


def require_refserver() -> None:
    missing = [m for m in ("refserver", "torch", "fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise BadInput(f"leakhunt demo needs the reference server's extra ({', '.join(missing)} missing): "
                       "pip install torch==2.13.0 && pip install 'leakhunt[refserver]'")


def run_demo(leak: str, out: Path, duration: float, leak_rate: float = DEFAULT_LEAK_RATE,
             progress: Callable[[str], None] = lambda step: None,
             on_update: Callable | None = None) -> DemoResult:
    require_refserver()
    from refserver.launch import LaunchError, launch   # the refserver extra: imported only here

    out.mkdir(parents=True, exist_ok=True)
    recording = out / "recording"
    if (recording / "session.json").exists():
        shutil.rmtree(recording)   # the previous demo's: a recording is one run, not two appended
    progress(f"starting the reference server (leak: {leak})")
    try:
        server = launch(leak=None if leak == "none" else [leak], leak_rate=leak_rate)
    except LaunchError as e:
        raise LeakhuntError(f"the reference server did not start: {e}") from None
    load = None
    try:
        progress(f"driving load ({LOAD_CONCURRENCY} concurrent clients) at {server.url}")
        loadgen = subprocess.Popen(
            [sys.executable, "-m", "refserver.loadgen", "--url", server.url, "--duration", str(duration + 30),
             "--concurrency", str(LOAD_CONCURRENCY), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            time.sleep(2)  # let the load reach steady state before the baseline sample
            target = open_target(server.pid)
            progress(f"investigating pid {server.pid}")
            writer = SessionWriter(recording, "demo", {"pid": server.pid, "cmdline": target.cmdline,
                                                       "leak_mode": leak, "server_url": server.url})
            investigation = Investigation(target, InvestigateOptions(duration=duration), writer, on_update)
            result = investigation.run()
            writer.finish({"command": "demo", "leak_mode": leak, **result.to_json()})
        finally:
            loadgen.terminate()
            try:
                stdout, _ = loadgen.communicate(timeout=20)
                load = json.loads(stdout) if stdout.strip() else None
            except (subprocess.TimeoutExpired, ValueError):
                loadgen.kill()
                loadgen.wait()
    finally:
        progress("stopping the reference server")
        server.stop()
    progress("writing the report")
    html, markdown = write_report(recording, out)
    return DemoResult(leak, out, result, load, html, markdown, server.pid, server.url)


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
