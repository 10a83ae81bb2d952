"""The command line: help, argument errors as one line and exit 2, doctor."""

from __future__ import annotations

import json

from conftest import run_leakhunt


def test_help_lists_the_commands():
    cp = run_leakhunt("--help")
    assert cp.returncode == 0
    for name in ("doctor", "watch"):
        assert name in cp.stdout


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
