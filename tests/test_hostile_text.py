"""A target's text is data. A process chooses its own command line and the names of the files it
maps: rich markup, terminal escape sequences (a window title, colours) and bytes that are not
UTF-8 in them must reach leakhunt's terminal output, its Markdown and HTML reports as visible
text, never as markup or control sequences, and never crash a command after its whole run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import run_leakhunt

EVIL_NAME = "app [red]x[/red] [/srv] :smile: \x1b]0;pwned\x07\x1b[31mEVIL\x1b[0m \x9b31m"
EVIL_FILE = b"evil [bold]file[red] \x1b[2J \xff\xfe.bin"  # no "/": that would be a directory
RAW = ("\x1b", "\x07", "\x9b")

SCRIPT = r"""
import mmap, os, sys, time
fd = os.open(os.fsencode(sys.argv[1]) + b"/" + NAME, os.O_RDWR)
held = [mmap.mmap(fd, 1 << 20)]          # a mapping whose path is hostile too
print("ready", os.getpid(), flush=True)
while True:
    held.append(mmap.mmap(-1, 256 << 10))  # some growth to judge
    held[-1][0:1] = b"x"
    time.sleep(0.1)
"""


@pytest.fixture
def hostile(tmp_path, spawn):
    path = os.fsencode(tmp_path) + b"/" + EVIL_FILE
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    script = tmp_path / "target.py"
    script.write_text(f"NAME = {EVIL_FILE!r}\n" + SCRIPT)
    # exec -a: the process's argv[0], and so its command line, is the hostile name.
    return spawn(["bash", "-c", 'exec -a "$0" "$@"', EVIL_NAME, sys.executable, str(script), str(tmp_path)])


def clean(cp: subprocess.CompletedProcess) -> None:
    text = cp.stdout + cp.stderr
    assert "Traceback" not in text and "MarkupError" not in text, text[-2000:]
    for raw in RAW:
        assert raw not in text, (raw, text[-2000:])


@pytest.mark.parametrize(
    "args",
    [
        ["maps", "--pid", "{pid}"],
        ["watch", "--pid", "{pid}", "--duration", "3s", "--interval", "0.5s"],
        ["ci", "--pid", "{pid}", "--max-slope", "1GB/min", "--duration", "3s", "--interval", "0.5s"],
    ],
    ids=["maps", "watch", "ci"],
)
def test_commands_show_the_targets_text_as_text(hostile, args):
    cp = run_leakhunt(*(a.replace("{pid}", str(hostile.pid)) for a in args), env={"COLUMNS": "200"})
    assert cp.returncode == 0, cp.stderr[-2000:]
    clean(cp)
    # What the target wrote is still there to read, escaped: its name's visible pieces.
    text = cp.stdout + cp.stderr
    if args[0] != "maps":
        assert "[red]x[/red]" in text and "\\x1b" in text


def test_json_keeps_the_text_as_it_is(hostile):
    cp = run_leakhunt("watch", "--pid", hostile.pid, "--duration", "2s", "--interval", "0.5s", "--json")
    assert cp.returncode == 0, cp.stderr[-2000:]
    doc = json.loads(cp.stdout)  # JSON escapes control characters itself: the data stays whole
    assert doc["cmdline"].startswith(EVIL_NAME)


@pytest.mark.bpf
def test_tracing_commands_and_the_report_stay_text(hostile, tmp_path):
    rec = tmp_path / "rec"
    cp = run_leakhunt(
        "investigate",
        "--pid",
        hostile.pid,
        "--duration",
        "8s",
        "--no-gdb-stacks",
        "--record",
        rec,
        env={"COLUMNS": "200"},
    )
    assert cp.returncode == 0, cp.stderr[-2000:]
    clean(cp)
    cp = run_leakhunt("trace-mmap", "--pid", hostile.pid, "--duration", "2s", env={"COLUMNS": "200"})
    assert cp.returncode == 0, cp.stderr[-2000:]
    clean(cp)
    cp = run_leakhunt("report", rec, "--html", tmp_path / "r.html", "--markdown", tmp_path / "r.md")
    assert cp.returncode == 0, cp.stderr[-2000:]
    clean(cp)
    for name in ("r.html", "r.md"):
        text = (tmp_path / name).read_text()
        for raw in RAW:
            assert raw not in text, (name, raw)
    md = (tmp_path / "r.md").read_text()
    assert "\\[red\\]" in md  # escaped brackets in prose: no link, no markup (code blocks keep it literal)
    assert "<script" not in (tmp_path / "r.html").read_text()
