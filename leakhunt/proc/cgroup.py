"""What the kernel charges: the target's memory cgroup (v1 or v2) and the /dev/shm filesystem.

The OOM killer of a container acts on the memory cgroup's charge, which counts tmpfs pages
(/dev/shm, memfd, SysV) that no process's RSS may show, and kernel memory. A reading gives the
usage, the effective limit (the smallest on the way to the root), the breakdown the kernel keeps
(anon, file, shmem, kernel) and how many OOM kills the cgroup has seen. Both hierarchies are read
through the cgroup filesystem as this process sees it (/proc/self/mountinfo); the target's
cgroup path comes from /proc/PID/cgroup, which the kernel prints relative to the reader's cgroup
namespace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from leakhunt.proc.target import PROC

#: v1 prints "no limit" as the largest page-aligned long.
_V1_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class CgroupReading:
    path: str  # the cgroup, as /proc/PID/cgroup names it
    version: int  # 1 or 2
    usage_bytes: int
    limit_bytes: int | None  # effective limit; None: unlimited
    stat: dict[str, int]  # anon, file, shmem, kernel (bytes), as far as the kernel says
    oom_kills: int | None

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "version": self.version,
            "usage_bytes": self.usage_bytes,
            "limit_bytes": self.limit_bytes,
            "stat": self.stat,
            "oom_kills": self.oom_kills,
        }

    @classmethod
    def from_json(cls, d: object) -> CgroupReading | None:
        if not isinstance(d, dict):
            return None
        try:
            limit = d.get("limit_bytes")
            oom = d.get("oom_kills")
            stat = d.get("stat") if isinstance(d.get("stat"), dict) else {}
            return cls(
                str(d.get("path", "")),
                int(d.get("version", 0)),
                int(d["usage_bytes"]),
                None if limit is None else int(limit),
                {str(k): int(v) for k, v in stat.items()},
                None if oom is None else int(oom),
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class FsUsage:
    """A filesystem's fill (statfs): for /dev/shm, what the next 'Bus error' waits on."""

    path: str
    used_bytes: int
    size_bytes: int

    def to_json(self) -> dict:
        return {"path": self.path, "used_bytes": self.used_bytes, "size_bytes": self.size_bytes}

    @classmethod
    def from_json(cls, d: object) -> FsUsage | None:
        if not isinstance(d, dict):
            return None
        try:
            return cls(str(d.get("path", "")), int(d["used_bytes"]), int(d["size_bytes"]))
        except (KeyError, TypeError, ValueError):
            return None


def _int(text: str) -> int | None:
    text = text.strip()
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _kv(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        v = _int(value)
        if key and v is not None:
            out[key] = v
    return out


def cgroup_mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> dict[int, tuple[Path, str]]:
    """version -> (mount point, the cgroup path at its root) of the memory hierarchy."""
    out: dict[int, tuple[Path, str]] = {}
    text = _read(mountinfo) or ""
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        kind = right.split()
        if len(fields) < 5 or not kind:
            continue
        root, point = fields[3], fields[4].replace("\\040", " ")
        if kind[0] == "cgroup2" and 2 not in out:
            out[2] = (Path(point), root)
        elif kind[0] == "cgroup" and len(kind) > 2 and "memory" in kind[2].split(",") and 1 not in out:
            out[1] = (Path(point), root)
    return out


def target_cgroups(pid: int, proc: Path = PROC) -> dict[int, str]:
    """version -> the target's memory cgroup path (v1: the memory controller's line; v2: '0::')."""
    out: dict[int, str] = {}
    for line in (_read(proc / str(pid) / "cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            out[2] = parts[2]
        elif "memory" in parts[1].split(","):
            out[1] = parts[2]
    return out


def _directory(mount: Path, root: str, path: str) -> Path:
    rel = path
    if root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
        rel = path[len(root) :]
    return mount / rel.lstrip("/")


def read_v1(directory: Path, path: str) -> CgroupReading | None:
    usage = _int(_read(directory / "memory.usage_in_bytes") or "")
    if usage is None:
        return None
    stat = _kv(_read(directory / "memory.stat"))
    limit = stat.get("hierarchical_memory_limit", _int(_read(directory / "memory.limit_in_bytes") or ""))
    oom = _kv(_read(directory / "memory.oom_control")).get("oom_kill")
    kernel = _int(_read(directory / "memory.kmem.usage_in_bytes") or "")
    breakdown = {
        "anon": stat.get("total_rss", stat.get("rss", 0)),
        "file": stat.get("total_cache", stat.get("cache", 0)),
        "shmem": stat.get("total_shmem", stat.get("shmem", 0)),
    }
    if kernel is not None:
        breakdown["kernel"] = kernel
    return CgroupReading(
        path, 1, usage, None if limit is None or limit >= _V1_UNLIMITED else limit, breakdown, oom
    )


def read_v2(directory: Path, path: str, mount: Path | None = None) -> CgroupReading | None:
    usage = _int(_read(directory / "memory.current") or "")
    if usage is None:
        return None
    stat = _kv(_read(directory / "memory.stat"))
    limit = None
    d = directory
    while True:  # the effective limit is the smallest on the way up
        mx = _int(_read(d / "memory.max") or "max")
        if mx is not None:
            limit = mx if limit is None else min(limit, mx)
        if mount is None or d == mount or d.parent == d or not str(d).startswith(str(mount)):
            break
        d = d.parent
    kernel = stat.get("kernel")
    if kernel is None:
        parts = [stat.get(k) for k in ("kernel_stack", "pagetables", "percpu", "sock", "slab")]
        kernel = sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None
    breakdown = {"anon": stat.get("anon", 0), "file": stat.get("file", 0), "shmem": stat.get("shmem", 0)}
    if kernel is not None:
        breakdown["kernel"] = kernel
    oom = _kv(_read(directory / "memory.events")).get("oom_kill")
    return CgroupReading(path, 2, usage, limit, breakdown, oom)


class CgroupReader:
    """Reads one target's memory cgroup, sample after sample (the paths are found once)."""

    def __init__(self, pid: int, proc: Path = PROC, mountinfo: Path = Path("/proc/self/mountinfo")) -> None:
        self.pid = pid
        self.proc = proc
        self.mounts = cgroup_mounts(mountinfo)
        self.reason: str | None = None  # why there is no reading, when there is none
        self._where: tuple[int, Path, str, Path] | None = None
        self._locate()

    def _locate(self) -> None:
        paths = target_cgroups(self.pid, self.proc)
        for version in (1, 2):  # v1 first: on a hybrid host the memory controller is there
            if version in paths and version in self.mounts:
                mount, root = self.mounts[version]
                directory = _directory(mount, root, paths[version])
                if (directory / ("memory.usage_in_bytes" if version == 1 else "memory.current")).exists():
                    self._where = (version, directory, paths[version], mount)
                    return
        self.reason = (
            "no memory cgroup found for the target"
            if paths
            else f"cannot read /proc/{self.pid}/cgroup (no cgroup support, or the process is gone)"
        )

    def read(self) -> CgroupReading | None:
        if self._where is None:
            return None
        version, directory, path, mount = self._where
        return read_v1(directory, path) if version == 1 else read_v2(directory, path, mount)


def dev_shm_usage(pid: int, proc: Path = PROC) -> FsUsage | None:
    """/dev/shm as the target sees it (its mount namespace, through /proc/PID/root)."""
    try:
        st = os.statvfs(proc / str(pid) / "root" / "dev" / "shm")
    except OSError:
        return None
    size = st.f_blocks * st.f_frsize
    return FsUsage("/dev/shm", (st.f_blocks - st.f_bfree) * st.f_frsize, size)


def time_to(limit: int | None, now: int, slope: float) -> float | None:
    """Seconds until ``now`` reaches ``limit`` at ``slope`` bytes/s (None: never, or no limit)."""
    if limit is None or slope <= 0:
        return None
    return max(0.0, (limit - now) / slope)
