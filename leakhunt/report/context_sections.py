"""Report sections about the run rather than the memory: the environment it ran in and the exact
commands that reproduce it."""

from __future__ import annotations

import datetime as dt
import shlex

import matplotlib

from leakhunt import __version__
from leakhunt.report.blocks import Code, Facts, Section
from leakhunt.report.device_sections import device_unavailable
from leakhunt.report.recorded import ReportData
from leakhunt.units import format_duration

#: session.json keys shown under their own labels; any other key a command adds is shown as is.
_KNOWN = {
    "format": None,
    "argv": None,
    "started": None,
    "tool": "recorded by",
    "command": "command",
    "host": "host",
    "kernel": "kernel",
    "python": "Python",
    "pid": "target pid",
    "cmdline": "target command line",
    "interval_s": "sample interval",
    "nspid": None,
}


def inner_pid(s: dict) -> int | None:
    """The target's pid inside its own pid namespace (a container), None when it has none (NSpid)."""
    nspid = s.get("nspid")
    if isinstance(nspid, list) and len(nspid) > 1 and nspid[-1] != nspid[0]:
        return nspid[-1]
    return None


def pid_text(s: dict) -> str:
    """'4507', or '4507 (1 in its pid namespace)' for a target in a container."""
    inner = inner_pid(s)
    return f"{s.get('pid', '?')}" + (f" ({inner} in its pid namespace)" if inner is not None else "")


def when(ts: float | None) -> str:
    if not ts:
        return "unknown"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def environment(data: ReportData) -> Section:
    s = data.session
    rows = [("started", when(s.get("started")))]
    for key, label in _KNOWN.items():
        if label and s.get(key) not in (None, ""):
            value = s[key]
            text = (
                format_duration(value) if key == "interval_s" else pid_text(s) if key == "pid" else str(value)
            )
            rows.append((label, text))
    for key, value in s.items():
        if key not in _KNOWN and value not in (None, "", [], {}):
            rows.append((key.replace("_", " "), value if isinstance(value, str) else str(value)))
    no_device = device_unavailable(data)
    if no_device:
        rows.append(("device memory (NVML)", no_device))
    streams = ", ".join(
        f"{name} ({sum(1 for _ in data.recording.records(name))})" for name in data.recording.streams()
    )
    rows += [
        ("streams", streams or "none"),
        ("recording", str(data.recording.dir)),
        ("rendered by", f"leakhunt {__version__}, matplotlib {matplotlib.__version__}"),
    ]
    return Section("Environment", "environment", (Facts(tuple(rows)),))


def _recorded_command(s: dict) -> str | None:
    argv = s.get("argv")
    if not isinstance(argv, list) or len(argv) < 2:
        return None
    return "leakhunt " + shlex.join(str(a) for a in argv[1:])


def reproduce(data: ReportData) -> Section:
    s, d = data.session, data.recording.dir
    cmdline = s.get("cmdline")
    lines = ["# render this report again"]
    lines.append(f"leakhunt report {shlex.quote(str(d))} --html report.html --markdown report.md")
    recorded = _recorded_command(s)
    if recorded:
        lines += ["", "# the command that made the recording", recorded]
    # The recorded pid is history by now: the commands below name the process to start or find.
    lines += ["", "# start the target again (PID: its new process id), then watch it"]
    if inner_pid(s) is not None:
        lines += [
            "# it ran in a container: PID is its pid on the host, e.g.",
            "#   docker inspect --format '{{.State.Pid}}' CONTAINER",
        ]
    if cmdline:
        lines.append(str(cmdline))
    interval = format_duration(s.get("interval_s") or 1.0)
    lines.append(f"leakhunt watch --pid PID --interval {interval} --record NEW_DIR")
    lines += ["", "# name the code that maps the memory", "leakhunt investigate --pid PID --record NEW_DIR"]
    if (d / "memray.bin").exists():
        lines += [
            "",
            "# the Python heap, by allocation site",
            f"memray flamegraph {shlex.quote(str(d / 'memray.bin'))}",
        ]
    return Section("Reproduce", "reproduce", (Code("\n".join(lines)),))
