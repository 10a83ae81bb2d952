"""leakhunt's own memory, judged by leakhunt: `ci` gates a long-running `watch` and `export`
sampling a real process ten times a second (a year of 1 Hz growth per sample would show)."""

from __future__ import annotations

import json
import shlex
import sys

import pytest
from conftest import run_leakhunt

#: What the gate allows leakhunt itself: well below what a user would notice in a day (1 MB/min
#: is 1.4 GB a day, so the history's bound has to hold, not only its thrift).
LIMIT = "1MB/min"


@pytest.mark.parametrize(
    "command",
    [
        ["watch", "--interval", "0.1s", "--full-every", "5", "--duration", "10m", "--json"],
        # A 5 s window: the slopes' window is bounded and fills within the gate's warm-up, so
        # what grows after it is a leak (a 15 min window fills for 15 min, legitimately).
        ["export", "--interval", "0.1s", "--window", "5s", "--port", "0", "--duration", "10m"],
    ],
    ids=["watch", "export"],
)
def test_leakhunt_does_not_leak_while_it_watches(leakers, spawn, command):
    target = spawn([leakers / "steady"])
    cp = run_leakhunt(
        "ci",
        "--max-slope",
        LIMIT,
        "--duration",
        "45s",
        "--json",
        "--",
        "sh",
        "-c",
        # exec: the gate watches leakhunt itself, whose own report goes nowhere
        f"exec {shlex.join([sys.executable, '-m', 'leakhunt', command[0], '--pid', str(target.pid), *command[1:]])}"
        " > /dev/null",
    )
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr[-2000:]
    doc = json.loads(cp.stdout)
    assert doc["status"] == "pass" and doc["summary"]["samples"] >= 40, doc
