"""Before gdb touches the target: may we ptrace it, is somebody else already tracing it, does it
live in another mount namespace. Every refusal is one line that says what to do.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass

from leakhunt.errors import AccessDenied, BackendUnavailable, TargetGone
from leakhunt.proc.target import PROC, Target, die_with_parent, proc_read

CAP_SYS_PTRACE = 19
PTRACE_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"


@dataclass(frozen=True)
class TraceAccess:
    gdb: str  # absolute path of the gdb to run
    foreign_mounts: bool  # the target sees another filesystem: gdb needs sysroot /proc/PID/root


def find_gdb(gdb_path: str) -> str:
    found = shutil.which(gdb_path)
    if found is None:
        fix = (
            "apt-get install gdb (leakhunt doctor --install)"
            if gdb_path == "gdb"
            else "give the path of a gdb (or cuda-gdb) with --gdb-path"
        )
        raise BackendUnavailable("gdb", f"{gdb_path} not found", fix)
    return found


def check_access(target: Target, gdb_path: str) -> TraceAccess:
    """Raise AccessDenied / TargetGone / BackendUnavailable unless gdb can attach to ``target``."""
    gdb = find_gdb(gdb_path)
    tracer = tracer_pid(target.pid)
    if tracer:
        raise AccessDenied(
            f"pid {target.pid} is already traced by pid {tracer} ({_comm(tracer)}): a process "
            f"has one tracer at a time; detach that debugger or strace first"
        )
    privileged = os.geteuid() == 0 or has_capability(CAP_SYS_PTRACE)
    scope = ptrace_scope()
    if scope == 3:
        raise AccessDenied(
            "ptrace is disabled on this machine (kernel.yama.ptrace_scope=3, "
            "only a reboot changes it): use a BPF backend"
        )
    if not privileged:
        if scope == 2:
            raise AccessDenied(
                "kernel.yama.ptrace_scope=2 allows ptrace only with CAP_SYS_PTRACE: run as root"
            )
        if target.uid != os.geteuid():
            raise AccessDenied(f"pid {target.pid} belongs to uid {target.uid}: run as root or as that user")
        if scope == 1 and not _is_ancestor_of(target.pid):
            raise AccessDenied(
                "kernel.yama.ptrace_scope=1 allows ptrace of descendants only: run as root, "
                "or: sysctl kernel.yama.ptrace_scope=0"
            )
    return TraceAccess(gdb, foreign_mount_namespace(target.pid))


def explain_attach_error(target: Target, message: str) -> Exception:
    """Turn gdb's refusal to attach into our one-line error."""
    lower = message.lower()
    if "no such process" in lower or not target.alive():
        return TargetGone(target.pid, f"process {target.pid} exited before gdb could attach")
    if "not permitted" in lower or "permission" in lower:
        tracer = tracer_pid(target.pid)
        if tracer:
            return AccessDenied(f"pid {target.pid} is already traced by pid {tracer} ({_comm(tracer)})")
        scope = ptrace_scope()
        hint = (
            f"kernel.yama.ptrace_scope={scope}: run as root or sysctl kernel.yama.ptrace_scope=0"
            if scope
            else "run as root, or give the container CAP_SYS_PTRACE"
        )
        return AccessDenied(f"gdb may not attach to pid {target.pid} ({message.strip()}): {hint}")
    return BackendUnavailable("gdb", f"gdb could not attach to pid {target.pid}: {message.strip()}", "")


def tracer_pid(pid: int) -> int:
    for line in proc_read(pid, "status").splitlines():
        if line.startswith(b"TracerPid:"):
            return int(line.split()[1])
    return 0


def ptrace_scope() -> int:
    try:
        with open(PTRACE_SCOPE) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0  # no Yama: ordinary permission checks only


def has_capability(cap: int) -> bool:
    for line in proc_read(os.getpid(), "status").splitlines():
        if line.startswith(b"CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def foreign_mount_namespace(pid: int) -> bool:
    try:
        return os.stat(PROC / str(pid) / "ns" / "mnt").st_ino != os.stat(PROC / "self" / "ns" / "mnt").st_ino
    except OSError:
        return False


def _is_ancestor_of(pid: int) -> bool:
    me = os.getpid()
    while pid > 1:
        try:
            pid = int(proc_read(pid, "stat").rsplit(b")", 1)[1].split()[1])
        except (TargetGone, AccessDenied, ValueError, IndexError):
            return False
        if pid == me:
            return True
    return False


def _comm(pid: int) -> str:
    try:
        return proc_read(pid, "comm").decode(errors="replace").strip()
    except (TargetGone, AccessDenied):
        return "?"


#: What gdb 13 prints when the kernel refuses the extended register state (XSAVE: AVX-512, AMX
#: tiles) it saved before calling a function in the inferior and writes back afterwards.
XSTATE_REFUSED = "Couldn't write extended state"
_call_probe: dict[str, str | None] = {}


def gdb_call_hazard(gdb: str = "gdb") -> str | None:
    """Why calling a function inside a target with this gdb would corrupt it, or None when it is
    safe. leakhunt's own gdb pass only sets breakpoints and reads; memray's attach calls dlopen
    in the target. On some CPUs and kernels (seen: an AMX Xeon, kernel 6.18, gdb 13.1) gdb cannot
    write back the extended register state after such a call: the call fails, and the target
    resumes with registers gdb could not restore (a sleeping Python target raised OSError 514
    from inside time.sleep). Probed once per process on a `sleep` of our own, never the target."""
    if gdb in _call_probe:
        return _call_probe[gdb]
    found = shutil.which(gdb)
    if found is None:
        return f"{gdb} not found"
    sleeper = subprocess.Popen(
        ["sleep", "30"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent(signal.SIGKILL),
    )
    try:
        cp = subprocess.run(
            [found, "-batch", "-nx", "-p", str(sleeper.pid), "-ex", "call (int) getpid()"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        out = cp.stdout + cp.stderr
        if XSTATE_REFUSED in out:
            why = (
                "gdb cannot restore this CPU's extended register state after a call into a process "
                f"({XSTATE_REFUSED.lower()}: a gdb/kernel/CPU mismatch); the target would resume corrupted"
            )
        elif f"= {sleeper.pid}" not in out:
            last = [line for line in out.splitlines() if line.strip()][-1:] or [f"exit {cp.returncode}"]
            why = f"gdb could not call a function in a test process: {last[0].strip()}"
        else:
            why = None
    except (OSError, subprocess.TimeoutExpired) as e:
        why = f"gdb could not call a function in a test process: {e}"
    finally:
        sleeper.kill()
        sleeper.wait()
    _call_probe[gdb] = why
    return why
