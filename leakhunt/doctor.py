"""What works on this machine for leakhunt, why not, and the fixes we can apply ourselves.

Each check is a plain function returning a Check; `--install` runs the fixes that are safe to
automate (apt packages, mounting tracefs, kernel-header symlinks for BCC, making the OS's BCC
module importable from a venv) and then checks again.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
DEBUGFS_TRACING = Path("/sys/kernel/debug/tracing")
OS_DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")

# Capability bit numbers (linux/capability.h).
CAPS = {"CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38, "CAP_BPF": 39}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # what a person (or --install) can do about it
    needed_by: str = ""  # which part of leakhunt needs it
    optional: bool = False  # nice to have: its absence is not a problem

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "fix": self.fix,
            "needed_by": self.needed_by,
            "optional": self.optional,
        }


@dataclass
class InstallLog:
    actions: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _run(argv: list[str], timeout: float = 20) -> tuple[int, str]:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 127, str(e)
    return cp.returncode, (cp.stdout + cp.stderr).strip()


def _capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges() -> list[Check]:
    caps = _capabilities()
    have = {name: bool(caps >> bit & 1) for name, bit in CAPS.items()}
    root = os.geteuid() == 0
    out = [
        Check(
            "root",
            root,
            "running as root" if root else f"running as uid {os.geteuid()}",
            "" if root else "run leakhunt with sudo for BPF tracing",
            "BPF tracers",
        )
    ]
    for name in ("CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE"):
        # Kernels before 5.8 have no CAP_BPF/CAP_PERFMON: CAP_SYS_ADMIN stands in for both.
        ok = have[name] or (name != "CAP_SYS_PTRACE" and have["CAP_SYS_ADMIN"])
        out.append(
            Check(
                name,
                ok,
                "effective" if have[name] else ("via CAP_SYS_ADMIN" if ok else "missing"),
                "" if ok else "run as root, or grant the capability (setcap / container securityContext)",
                "gdb backend" if name == "CAP_SYS_PTRACE" else "BPF tracers",
            )
        )
    out.append(
        Check(
            "CAP_SYS_RESOURCE",
            have["CAP_SYS_RESOURCE"],
            "effective"
            if have["CAP_SYS_RESOURCE"]
            else "missing: RLIMIT_MEMLOCK cannot be raised (bpftrace warns; modern kernels charge BPF maps to memcg)",
            "",
            "BPF tracers",
            optional=True,
        )
    )
    return out


def check_ptrace_scope() -> Check:
    path = Path("/proc/sys/kernel/yama/ptrace_scope")
    if not path.exists():
        return Check(
            "kernel.yama.ptrace_scope",
            True,
            "Yama not enabled: ptrace limited by permissions only",
            needed_by="gdb backend",
        )
    scope = int(path.read_text())
    meaning = {
        0: "any process of the same user",
        1: "only descendants (or CAP_SYS_PTRACE)",
        2: "only CAP_SYS_PTRACE",
        3: "ptrace disabled",
    }.get(scope, "unknown")
    ok = scope == 0 or (scope in (1, 2) and bool(_capabilities() >> CAPS["CAP_SYS_PTRACE"] & 1))
    return Check(
        "kernel.yama.ptrace_scope",
        ok,
        f"{scope}: {meaning}",
        "" if ok else "run as root, or: sysctl kernel.yama.ptrace_scope=0",
        "gdb backend",
    )


def _is_dir(path: Path) -> bool:
    """is_dir() that answers False where this user may not look (non-root and tracefs)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def tracefs_root() -> Path | None:
    for root in (TRACEFS, DEBUGFS_TRACING):
        if _is_dir(root / "events"):
            return root
    return None


def check_tracing() -> list[Check]:
    root = tracefs_root()
    hidden = root is None and os.geteuid() != 0 and os.path.isdir(TRACEFS)
    out = [
        Check(
            "tracefs",
            root is not None,
            f"mounted at {root}"
            if root
            else ("not readable by this user (the BPF tracers need root)" if hidden else "not mounted"),
            "" if root else ("run as root" if hidden else "mount -t tracefs tracefs /sys/kernel/tracing"),
            "BPF tracers",
        )
    ]
    tp = root / "events/syscalls/sys_enter_mmap" if root else None
    out.append(
        Check(
            "syscall tracepoints",
            bool(tp and _is_dir(tp)),
            "syscalls:sys_enter_mmap present"
            if tp and _is_dir(tp)
            else ("tracefs missing" if root is None else "kernel built without CONFIG_FTRACE_SYSCALLS"),
            "" if tp and _is_dir(tp) else "mount tracefs (leakhunt doctor --install)",
            "BPF tracers",
        )
    )
    btf = Path("/sys/kernel/btf/vmlinux").exists()
    out.append(
        Check(
            "BTF",
            btf,
            "/sys/kernel/btf/vmlinux" if btf else "no kernel BTF",
            "" if btf else "needs a kernel with CONFIG_DEBUG_INFO_BTF",
            "bpftrace struct access",
            optional=True,
        )
    )
    kprobes = bool(root and (root / "kprobe_events").exists())
    out.append(
        Check(
            "kprobes",
            kprobes,
            "available" if kprobes else "kernel has no kprobes (tracepoints are used instead)",
            "",
            "BCC memleak (peer in bench/)",
            optional=True,
        )
    )
    uprobes = bool(root and (root / "uprobe_events").exists())
    out.append(
        Check(
            "uprobes",
            uprobes,
            "available" if uprobes else "kernel has no uprobes",
            "",
            "BPF tracers (user-space probes)",
            optional=True,
        )
    )
    return out


def check_bpftrace() -> Check:
    path = shutil.which("bpftrace")
    if not path:
        return Check(
            "bpftrace",
            False,
            "not installed",
            "apt-get install bpftrace (leakhunt doctor --install)",
            "bpftrace backend",
        )
    rc, out = _run([path, "--version"])
    return Check("bpftrace", rc == 0, out.splitlines()[0] if out else f"exit {rc}", "", "bpftrace backend")


def check_bcc() -> Check:
    # In a subprocess: importing bcc loads libbcc, which we do not want in doctor's own process.
    rc, out = _run([sys.executable, "-c", "import bcc, sys; sys.stdout.write(bcc.__file__)"])
    if rc == 0:
        return Check("BCC (python3-bpfcc)", True, f"importable ({out})", "", "bcc backend")
    if (OS_DIST_PACKAGES / "bcc").is_dir():
        return Check(
            "BCC (python3-bpfcc)",
            False,
            "installed for the OS Python but not importable here",
            "leakhunt doctor --install (links it into this environment)",
            "bcc backend",
        )
    return Check(
        "BCC (python3-bpfcc)",
        False,
        "not installed",
        "apt-get install python3-bpfcc (leakhunt doctor --install); never pip install 'bcc'",
        "bcc backend",
    )


def check_kernel_headers() -> Check:
    build = Path(f"/lib/modules/{platform.release()}/build")
    ok = (build / "include").is_dir() or (build / "Makefile").exists()
    return Check(
        "kernel headers",
        ok,
        str(build.resolve()) if ok else f"{build} missing",
        "" if ok else "leakhunt doctor --install (links the installed linux-headers)",
        "bcc backend",
    )


def _version_check(name: str, argv: list[str], needed_by: str, fix: str, optional: bool = False) -> Check:
    if not shutil.which(argv[0]):
        return Check(name, False, "not installed", fix, needed_by, optional)
    rc, out = _run(argv)
    first = out.splitlines()[0] if out else f"exit {rc}"
    return Check(name, rc == 0, first, "" if rc == 0 else fix, needed_by, optional)


def check_gdb() -> Check:
    return _version_check(
        "gdb", ["gdb", "--version"], "gdb backend", "apt-get install gdb (leakhunt doctor --install)"
    )


def check_gdb_calls() -> Check:
    """Whether gdb can call a function inside a process and restore its registers after: memray's
    attach (--heap on a running pid) injects itself that way."""
    from leakhunt.gdb.preflight import gdb_call_hazard

    if not shutil.which("gdb"):
        return Check("gdb calls", False, "gdb not installed", "apt-get install gdb", "--heap --pid", True)
    hazard = gdb_call_hazard("gdb")
    return Check(
        "gdb calls",
        hazard is None,
        "gdb calls into a process and restores its registers" if hazard is None else hazard,
        "" if hazard is None else "use --heap with a command leakhunt starts (memray's run mode)",
        "--heap --pid",
        optional=True,
    )


def check_perf() -> Check:
    return _version_check(
        "perf", ["perf", "--version"], "benchmarks", "apt-get install linux-perf", optional=True
    )


def check_memray() -> Check:
    rc, out = _run([sys.executable, "-c", "import memray; print(memray.__version__)"])
    return Check(
        "memray",
        rc == 0,
        f"memray {out}" if rc == 0 else "not installed",
        "" if rc == 0 else "pip install memray",
        "heap vs RSS in reports",
        optional=True,
    )


def check_nvml() -> Check:
    from leakhunt.gpu import GpuUnavailable, NvmlReader

    reader = NvmlReader.open()
    if isinstance(reader, GpuUnavailable):
        return Check(
            "NVML / GPU",
            False,
            f"{reader.reason}: device memory is not sampled (everything else works)",
            "",
            "device memory series",
            optional=True,
        )
    detail = f"{reader.devices} GPU(s), driver {reader._nvml.nvmlSystemGetDriverVersion()}"
    reader.close()
    return Check("NVML / GPU", True, detail, "", "device memory series", optional=True)


def check_backends() -> list[Check]:
    from leakhunt.errors import BackendUnavailable
    from leakhunt.trace.backend import BACKENDS, backend_class

    out = []
    for name in BACKENDS:
        caveat = ""
        try:
            cls = backend_class(name)
            reason, caveat = cls.unavailable_reason(), cls.caveat
        except BackendUnavailable as e:
            reason = e.reason
        out.append(
            Check(
                f"backend: {name}",
                reason is None,
                ("works here" + (f"; {caveat}" if caveat else "")) if reason is None else reason,
                "" if reason is None else "leakhunt doctor --install",
                "trace-mmap, investigate",
            )
        )
    return out


def run_checks() -> list[Check]:
    checks = check_privileges()
    checks.append(check_ptrace_scope())
    checks += check_tracing()
    checks += [
        check_bpftrace(),
        check_bcc(),
        check_kernel_headers(),
        check_gdb(),
        check_gdb_calls(),
        check_perf(),
        check_memray(),
        check_nvml(),
    ]
    checks += check_backends()
    return checks


# -- fixes ----------------------------------------------------------------------------------------


def _headers_package() -> str:
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    flavour = (
        "cloud"
        if "cloud" in platform.release() or not _has_apt_package(f"linux-headers-{platform.release()}")
        else ""
    )
    return f"linux-headers-{platform.release()}" if not flavour else f"linux-headers-cloud-{arch}"


def _has_apt_package(name: str) -> bool:
    rc, out = _run(["apt-cache", "policy", name])
    return rc == 0 and "Candidate:" in out and "Candidate: (none)" not in out


def _installed(package: str) -> bool:
    rc, out = _run(["dpkg-query", "-W", "-f=${Status}", package])
    return rc == 0 and "install ok installed" in out


def apt_packages() -> list[str]:
    """What leakhunt's backends need from the OS."""
    return ["gdb", "bpftrace", "python3-bpfcc", _headers_package()]


def fix_apt(packages: list[str], log: InstallLog) -> None:
    missing = [p for p in packages if not _installed(p)]
    if not missing:
        return
    if not shutil.which("apt-get"):
        log.failures.append(f"cannot install {' '.join(missing)}: no apt-get on this system")
        return
    if os.geteuid() != 0:
        log.failures.append(f"cannot install {' '.join(missing)}: needs root")
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        cp = subprocess.run(argv, capture_output=True, text=True, env=env)
        if cp.returncode != 0:
            log.failures.append(f"{' '.join(argv[:3])} failed: {cp.stderr.strip().splitlines()[-1:]}")
            return
    log.actions.append(f"apt-get install {' '.join(missing)}")


def fix_tracefs(log: InstallLog) -> None:
    if tracefs_root() is not None:
        return
    rc, out = _run(["mount", "-t", "tracefs", "tracefs", str(TRACEFS)])
    (log.actions if rc == 0 else log.failures).append(
        f"mount -t tracefs tracefs {TRACEFS}" + ("" if rc == 0 else f": {out}")
    )


def fix_kernel_headers(log: InstallLog) -> None:
    """BCC compiles against /lib/modules/$(uname -r)/build. When the distribution's headers are
    for another kernel version (a cloud VM's custom kernel), link the installed ones: BCC's
    programs use stable UAPI and BTF-independent structures, so close is good enough."""
    modules = Path(f"/lib/modules/{platform.release()}")
    if (modules / "build" / "include").is_dir():
        return
    candidates = sorted(glob.glob("/usr/src/linux-headers-*"), key=_version_key)
    arch_dirs = [c for c in candidates if not c.endswith("-common") and "kbuild" not in c]
    common = [c for c in candidates if c.endswith("-common")]
    if not arch_dirs:
        log.failures.append("no /usr/src/linux-headers-* installed to link")
        return
    build, source = arch_dirs[-1], (common[-1] if common else arch_dirs[-1])
    try:
        modules.mkdir(parents=True, exist_ok=True)
        for name, target in (("build", build), ("source", source)):
            link = modules / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
    except OSError as e:
        log.failures.append(f"cannot link kernel headers into {modules}: {e.strerror}")
        return
    log.actions.append(f"linked {modules}/build -> {build} and source -> {source}")


def _version_key(path: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"[.-]", path)]


def fix_bcc_import(log: InstallLog) -> None:
    """Make the OS's BCC package importable from this (virtual) environment."""
    if check_bcc().ok or not (OS_DIST_PACKAGES / "bcc").is_dir():
        return
    from leakhunt.trace.bcc import ensure_bcc_importable

    why = ensure_bcc_importable()
    if why:
        log.failures.append(why)
    else:
        log.actions.append(
            f"made the OS's python3-bpfcc importable here ({sysconfig.get_paths()['purelib']})"
        )


def install(
    extra_packages: list[str] | None = None, progress: Callable[[str], None] | None = None
) -> InstallLog:
    log = InstallLog()
    steps = [
        ("system packages", lambda: fix_apt(apt_packages() + list(extra_packages or []), log)),
        ("tracefs", lambda: fix_tracefs(log)),
        ("kernel headers", lambda: fix_kernel_headers(log)),
        ("BCC in this environment", lambda: fix_bcc_import(log)),
    ]
    for label, step in steps:
        if progress:
            progress(label)
        step()
    return log
