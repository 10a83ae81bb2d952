"""The backends' set-up, without tracing: probes get every constant they use from
leakhunt.trace.events, BCC is the OS's, the kernel-stack arithmetic, backend choice."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import need

from leakhunt import resources
from leakhunt.errors import BackendUnavailable
from leakhunt.trace.backend import BACKENDS, TraceOptions
from leakhunt.trace.bcc import OS_BCC, _bcc_origin, cflags, ensure_bcc_importable, program_text
from leakhunt.trace.bpftrace import perf_pages, pt_regs_offset, script_text
from leakhunt.trace.events import SYSCALL_NUMBERS
from leakhunt.trace.session import choose_backend

# Upper-case names a probe uses that are its own (enums, kernel macros, bpftrace builtins).
OWN = {
    "BPF_RB_NO_WAKEUP",
    "BPF_F_NO_PREALLOC",
    "BPF_HASH",
    "BPF_F_TABLE",
    "BPF_PERCPU_ARRAY",
    "BPF_ARRAY",
    "BPF_PROG_ARRAY",
    "BPF_RINGBUF_OUTPUT",
    "RAW_TRACEPOINT_PROBE",
    "TRACEPOINT_PROBE",
    "BEGIN",
    "END",
}


def _constants(text: str) -> set[str]:
    body = re.sub(r"/\*.*?\*/", "", text, flags=re.S)  # not the header comment
    return {w for w in re.findall(r"\b[A-Z][A-Z0-9_]{2,}\b", body) if w not in OWN}


def test_the_bpftrace_probe_gets_every_constant_it_uses():
    text = script_text(1234, follow=True, min_len=4096)
    defined = set(re.findall(r"^#define (\w+) ", text, flags=re.M))
    assert _constants(resources.probe("mmap_ledger.bt").read_text()) <= defined
    for kind, nr in SYSCALL_NUMBERS.items():
        assert f"#define NR_{kind.name} {nr}\n" in text


def test_the_bcc_program_gets_every_constant_it_uses():
    flags = cflags(1234, TraceOptions(follow=True, extra={"stream_all": True}))
    defined = {f[2:].split("=")[0] for f in flags}
    assert _constants(program_text()) <= defined  # the headers it pastes in too
    assert "-DSTREAM_ALL=1" in flags and "-DFOLLOW=1" in flags


def test_bcc_comes_from_the_os_package():
    need((OS_BCC / "__init__.py").is_file(), "python3-bpfcc is not installed")
    assert ensure_bcc_importable() is None
    assert Path(_bcc_origin()).resolve().is_relative_to(OS_BCC.resolve())


def test_without_the_os_package_bcc_is_refused_in_one_line(tmp_path, monkeypatch):
    """Where python3-bpfcc is missing (its directory points nowhere here), the reason names it."""
    import leakhunt.trace.bcc as bcc_module

    monkeypatch.setattr(bcc_module, "OS_BCC", tmp_path / "bcc")
    monkeypatch.setattr(bcc_module, "_bcc_origin", lambda: None)
    problem = bcc_module.ensure_bcc_importable()
    assert problem == "python3-bpfcc is not installed (apt-get install python3-bpfcc)"


@pytest.mark.parametrize(
    "config, offset",
    [
        ({}, 16384 - 168),
        ({"CONFIG_KASAN": "y"}, 32768 - 168),
        ({"CONFIG_X86_FRED": "y"}, 16384 - 16 - 168),
    ],
)
def test_user_registers_sit_at_the_top_of_the_kernel_stack(config, offset):
    assert pt_regs_offset(config) == offset


def test_perf_buffers_stay_bounded_and_powers_of_two():
    pages = perf_pages()
    assert 64 <= pages <= 4096 and pages & (pages - 1) == 0


def test_an_unknown_backend_says_in_one_line_which_there_are():
    with pytest.raises(BackendUnavailable) as e:
        choose_backend("perf")
    assert "\n" not in str(e.value) and "bcc, bpftrace, gdb" in str(e.value)


def test_auto_prefers_the_registry_order():
    choice = choose_backend("auto")
    assert choice.name in BACKENDS
    assert list(BACKENDS).index(choice.name) <= min(
        list(BACKENDS).index(n) for n in BACKENDS if n not in choice.unavailable
    )
    assert choice.explain().startswith(f"backend {choice.name}")
