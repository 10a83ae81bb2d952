"""The process we look at: validation of a pid, and the few /proc readers besides smaps.

Every /proc read goes through ``proc_read`` so that a process that exits mid-read becomes
``TargetGone`` and a permission problem becomes ``AccessDenied``, with one line that says what to do.
A pid is identified by (pid, start time) so that a recycled pid is never mistaken for the target.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from leakhunt.errors import AccessDenied, TargetGone

try:
    from leakhunt.proc import _smaps
except ImportError:  # built without a C compiler: reads in pieces from Python
    _smaps = None

PROC = Path(os.environ.get("LEAKHUNT_PROC", "/proc"))

#: /proc/PID/status fields we keep (kB in the file, bytes here), besides Threads.
STATUS_FIELDS = (
    "VmPeak",
    "VmSize",
    "VmLck",
    "VmPin",
    "VmHWM",
    "VmRSS",
    "RssAnon",
    "RssFile",
    "RssShmem",
    "VmData",
    "VmStk",
    "VmExe",
    "VmLib",
    "VmPTE",
    "VmSwap",
)


#: Reads of /proc files in pieces of this size, where the C helper (_smaps.read_fd: the whole file
#: in one call, without the GIL) is not built: a 1 MiB buffer is a fresh mmap each time (glibc's
#: threshold), and its page faults made a 35 MB smaps read 25% slower than 128 KiB pieces do.
READ_CHUNK = 128 * 1024


def _proc_open(pid: int, name: str) -> int:
    """Open /proc/PID/NAME. For smaps, smaps_rollup, maps and mem the kernel checks ptrace read
    access at open: the errors a disappearing or foreign process causes come from here."""
    path = PROC / str(pid) / name
    try:
        return os.open(path, os.O_RDONLY)
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone(pid) from None
    except PermissionError:
        raise AccessDenied(
            f"cannot read {path}: permission denied (run as root or as the process owner)"
        ) from None


def proc_read(pid: int, name: str) -> bytes:
    """Read /proc/PID/NAME whole; map the errors a disappearing or foreign process causes."""
    path = PROC / str(pid) / name
    fd = _proc_open(pid, name)
    try:
        if _smaps is not None:
            return _smaps.read_fd(fd)
        chunks = []
        while chunk := os.read(fd, READ_CHUNK):
            chunks.append(chunk)
    except ProcessLookupError:
        raise TargetGone(pid, f"process {pid} exited") from None
    except PermissionError:
        raise AccessDenied(
            f"cannot read {path}: permission denied (the process changed credentials?)"
        ) from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def kb_fields(text: bytes, keep: tuple[str, ...] | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    wanted = None if keep is None else {k.encode() for k in keep}
    for line in text.splitlines():
        name, sep, rest = line.partition(b":")
        if not sep or (wanted is not None and name not in wanted):
            continue
        key = name.decode()
        parts = rest.split()
        if len(parts) == 2 and parts[1] == b"kB" and parts[0].isdigit():
            out[key] = int(parts[0]) * 1024
        elif len(parts) == 1 and parts[0].isdigit():
            out[key] = int(parts[0])
    return out


def read_status(pid: int) -> dict[str, int]:
    """Memory fields of /proc/PID/status in bytes, plus Threads."""
    return kb_fields(proc_read(pid, "status"), STATUS_FIELDS + ("Threads",))


@dataclass(frozen=True)
class Target:
    """A live process, pinned by its start time so that pid reuse cannot fool us."""

    pid: int
    start_time: int  # clock ticks since boot, field 22 of /proc/PID/stat
    comm: str
    cmdline: str
    uid: int
    nspid: tuple[int, ...]  # the pid in each nested pid namespace, outermost first

    @property
    def root(self) -> Path:
        """The process's view of the filesystem (differs from ours in a container)."""
        return PROC / str(self.pid) / "root"

    def alive(self) -> bool:
        try:
            return _start_time(self.pid) == self.start_time and _state(self.pid) not in ("Z", "X")
        except (TargetGone, AccessDenied):
            return False

    def describe(self) -> str:
        # In a container the user knows the pid inside (NSpid's last): name both.
        inside = (
            f"; pid {self.nspid[-1]} inside" if len(self.nspid) > 1 and self.nspid[-1] != self.pid else ""
        )
        return f"pid {self.pid} ({self.cmdline[:60] or self.comm}{inside})"


def read_cmdline(pid: int) -> str:
    """The command line, arguments joined by spaces ('' for a kernel thread). Raises TargetGone."""
    return proc_read(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace").strip()


def _stat_fields(pid: int) -> list[str]:
    stat = proc_read(pid, "stat").decode(errors="replace")
    # comm may contain spaces and parentheses: split after the last ')'.
    return stat[stat.rindex(")") + 2 :].split()


def _start_time(pid: int) -> int:
    return int(_stat_fields(pid)[19])


def _state(pid: int) -> str:
    return _stat_fields(pid)[0]


def open_target(pid: int) -> Target:
    """Validate that ``pid`` is a live process whose memory we may read."""
    if pid <= 0:
        raise TargetGone(pid, f"invalid pid {pid}")
    fields = _stat_fields(pid)
    if fields[0] in ("Z", "X"):
        raise TargetGone(pid, f"process {pid} has exited (zombie)")
    status = proc_read(pid, "status").decode(errors="replace")
    info = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    comm = info.get("Name", "").strip()
    uid = int(info.get("Uid", "0").split()[0])
    nspid = tuple(int(x) for x in info.get("NSpid", str(pid)).split()) or (pid,)
    cmdline = read_cmdline(pid)
    if not cmdline:
        raise TargetGone(pid, f"pid {pid} ({comm}) is a kernel thread: it has no user memory")
    # smaps needs ptrace read access: check now so the failure is one line at the start. Opening
    # is the check (reading smaps_rollup would walk every page table of a large process for it).
    os.close(_proc_open(pid, "smaps_rollup"))
    return Target(pid, int(fields[19]), comm, cmdline, uid, nspid)


def read_memory(pid: int, address: int, size: int) -> bytes | None:
    """Bytes of the target's memory (/proc/PID/mem), None where they cannot be read."""
    try:
        fd = os.open(PROC / str(pid) / "mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.pread(fd, size, address)
    except OSError:
        return None
    finally:
        os.close(fd)


def write_memory(pid: int, address: int, data: bytes) -> bool:
    """Write into the target (text pages included: /proc/PID/mem writes with FOLL_FORCE)."""
    try:
        fd = os.open(PROC / str(pid) / "mem", os.O_WRONLY)
    except OSError:
        return False
    try:
        return os.pwrite(fd, data, address) == len(data)
    except OSError:
        return False
    finally:
        os.close(fd)


def shm_segment_size(pid: int, shmid: int) -> int:
    """Size of a System V segment (for shmat events), 0 when unknown.

    /proc/sysvipc/shm lists the segments of the *reader's* IPC namespace: only trust it when the
    target shares ours."""
    try:
        if os.stat(PROC / str(pid) / "ns" / "ipc").st_ino != os.stat(PROC / "self" / "ns" / "ipc").st_ino:
            return 0
        with open(PROC / "sysvipc" / "shm") as f:
            next(f)  # header: key shmid perms size ...
            for line in f:
                fields = line.split()
                if len(fields) > 3 and int(fields[1]) == shmid:
                    return int(fields[3])
    except (OSError, ValueError, StopIteration):
        return 0
    return 0


PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> Callable[[], None]:
    """For a child's preexec_fn: the kernel sends it ``sig`` when leakhunt dies, even by SIGKILL
    (PR_SET_PDEATHSIG: it outlives exec)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def set_it() -> None:
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return set_it
