"""The command line: help, argument errors as one line and exit 2, doctor."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import run_leakhunt

from leakhunt.cli import COMMANDS


def test_help_lists_the_commands():
    cp = run_leakhunt("--help")
    assert cp.returncode == 0
    listed = {line.split()[0] for line in cp.stdout.split("Commands:", 1)[1].splitlines() if line.strip()}
    assert listed == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name):
    cp = run_leakhunt(name, "--help")
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
    assert cp.stdout.startswith(f"Usage: leakhunt {name}"), cp.stdout[:200]


def test_bad_duration_is_a_usage_error():
    cp = run_leakhunt("watch", "--pid", "1", "--duration", "5 fortnights")
    assert cp.returncode == 2
    assert "not a duration" in cp.stderr and "Traceback" not in cp.stderr


def test_unknown_command():
    cp = run_leakhunt("frobnicate")
    assert cp.returncode == 2 and "No such command" in cp.stderr


def test_doctor_json_lists_every_check():
    cp = run_leakhunt("doctor", "--json")
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    names = {c["name"] for c in doc["checks"]}
    for expected in (
        "root",
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_SYS_PTRACE",
        "kernel.yama.ptrace_scope",
        "tracefs",
        "syscall tracepoints",
        "BTF",
        "kprobes",
        "uprobes",
        "bpftrace",
        "BCC (python3-bpfcc)",
        "kernel headers",
        "gdb",
        "perf",
    ):
        assert expected in names
    assert all(isinstance(c["ok"], bool) and c["detail"] for c in doc["checks"])


def test_doctor_install_is_idempotent():
    # `make test` ran `doctor --install` already: a second run has nothing left to do.
    cp = run_leakhunt("doctor", "--install", "--json", timeout=600)
    doc = json.loads(cp.stdout)
    assert doc["install"]["failures"] == []
    assert doc["install"]["actions"] == []


def test_doctor_says_whether_nvml_and_a_gpu_are_there():
    doc = json.loads(run_leakhunt("doctor", "--json").stdout)
    nvml = next(c for c in doc["checks"] if c["name"] == "NVML / GPU")
    assert nvml["optional"]
    if not nvml["ok"]:
        assert "device memory is not sampled (everything else works)" in nvml["detail"]


def test_doctor_works_for_a_user_who_is_not_root():
    """The first thing a non-root user runs: it says what is missing, and never crashes."""
    import shutil

    setpriv = shutil.which("setpriv")
    drop = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"] if setpriv else []
    probe = (
        subprocess.run([*drop, sys.executable, "-c", "import leakhunt"], capture_output=True)
        if drop
        else None
    )
    if not probe or probe.returncode != 0:
        pytest.skip("cannot run this checkout's Python as nobody here (setpriv, or a private checkout)")
    cp = subprocess.run(
        [*drop, sys.executable, "-m", "leakhunt", "doctor", "--json"], capture_output=True, text=True
    )
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
    checks = {c["name"]: c for c in json.loads(cp.stdout)["checks"]}
    assert checks["root"]["ok"] is False and checks["tracefs"]["ok"] is False


@pytest.mark.parametrize(
    "args, says",
    [
        (["watch", "--pid", "1", "--interval", "0"], "more than zero"),
        (["watch", "--pid", "1", "--duration", "0s"], "more than zero"),
        (["trace-mmap", "--pid", "1", "--backend", "gdb", "--gdb-time-budget", "0s"], "more than zero"),
        (
            ["ci", "--max-slope", "1MB/min", "--load", 'unbalanced "quote', "--", "true"],
            "No closing quotation",
        ),
        (["export", "--pid", "1", "--host", "not..a..host"], "neither an IP address nor a host name"),
        (["maps", "/dev/zero"], "not a regular file"),
        (["maps", "--pid", "2"], "kernel thread"),
        (["watch", "--pid", "1", "--interval", "1e400"], "not a duration"),
    ],
    ids=["interval-0", "duration-0", "gdb-budget-0", "load-quote", "host", "dev-zero", "kthread", "huge"],
)
def test_what_cannot_work_is_one_line_and_exit_2(args, says):
    cp = run_leakhunt(*args)
    assert cp.returncode == 2 and says in cp.stderr and "Traceback" not in cp.stderr, cp.stderr


def test_a_gzip_bomb_and_a_full_disk_are_one_line(tmp_path):
    import gzip

    bomb = tmp_path / "bomb.smaps.gz"
    bomb.write_bytes(gzip.compress(b"\0" * (64 << 20)))
    cp = run_leakhunt("maps", bomb, env={"LEAKHUNT_MAX_INPUT": "16MiB"})
    assert cp.returncode == 2 and "decompresses to more than" in cp.stderr, cp.stderr
    with open("/dev/full", "w") as full:
        cp = subprocess.run(
            [sys.executable, "-m", "leakhunt", "maps", "--pid", str(os.getpid())],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert cp.returncode == 2 and "No space left" in cp.stderr and "Traceback" not in cp.stderr
