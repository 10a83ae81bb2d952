"""Every process on the node, cheaply: which one is leaking, before anyone knows a pid.

A full smaps sample walks page tables; across hundreds of processes every few seconds that is
real CPU. Here a process costs a read of /proc/PID/status (the kernel's counters: no walk) each
tick, and of /proc/PID/maps (no walk either) only when its address space changed (VmSize) or
every few ticks. The footprint is the one watch judges, from counters instead of smaps: RSS less
its resident shared-memory pages (RssShmem), plus every shmem-backed object it maps counted whole
(st_blocks through /proc/PID/map_files, each object once per process).

Containers and pods are named from the cgroup path (Docker, containerd, CRI-O, Kubernetes pods
under cgroupfs or systemd), and a process in a pid namespace of its own shows its pid there.
"""

from __future__ import annotations

import os
import re
from collections import deque
from dataclasses import dataclass, field

from leakhunt.proc.shmem import REFRESH_EVERY, kind_of
from leakhunt.proc.target import PROC

#: A process's address space is re-listed at least this often (ticks) even when VmSize is still.
MAPS_EVERY = 6
#: Samples kept per process for its slope (older ones drop off).
WINDOW = 720

_SHMEM_PATH = re.compile(r"^(/dev/shm/|/?memfd:|/SYSV|/dev/zero|/anon_hugepage|\[anon_shmem:)")
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
_CONTAINER = re.compile(
    r"(?:docker|cri-containerd|crio|containerd|libpod)[-/]([0-9a-f]{12,64})|/([0-9a-f]{64})(?:\.scope)?$"
)


@dataclass(frozen=True)
class Placement:
    """Where a process lives: its memory cgroup, and the container and pod that names."""

    cgroup: str
    container: str | None
    pod: str | None


def placement(pid: int) -> Placement:
    """From /proc/PID/cgroup."""
    try:
        return parse_placement((PROC / str(pid) / "cgroup").read_text())
    except OSError:
        return Placement("", None, None)


def parse_placement(text: str) -> Placement:
    """/proc/PID/cgroup's text: the memory controller's line on v1, '0::' on v2."""
    path = ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and ("memory" in parts[1].split(",") or (parts[0] == "0" and not path)):
            path = parts[2]
            if "memory" in parts[1].split(","):
                break
    pod = _POD.search(path)
    container = None
    for m in _CONTAINER.finditer(path):
        container = (m.group(1) or m.group(2))[:12]
    return Placement(path, container, pod.group(1).replace("_", "-") if pod else None)


def _status(pid: int) -> dict[str, int] | None:
    try:
        with open(PROC / str(pid) / "status", "rb") as f:
            text = f.read()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.split(b"\n"):
        key, _, value = line.partition(b":")
        if key in (b"VmRSS", b"RssShmem", b"VmSize"):
            out[key.decode()] = int(value.split()[0]) * 1024
        elif key == b"NSpid":
            out["nspid"] = int(value.split()[-1])
    return out if "VmSize" in out else None  # kernel threads have no memory


def _command(pid: int) -> str:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    if not raw:
        try:
            return "[" + (PROC / str(pid) / "comm").read_text().strip() + "]"
        except OSError:
            return ""
    return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()


@dataclass
class ProcessTrack:
    pid: int
    command: str
    place: Placement
    nspid: int
    t: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    rss: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    footprint: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    held: int = 0
    vmsize: int = -1
    maps_tick: int = -MAPS_EVERY
    objects: dict = field(default_factory=dict)  # (dev, inode) -> [bytes, range, tick measured]
    tmpfs: set = field(default_factory=set)


class NodeSampler:
    """One tick looks at every process that passes ``keep`` (a command or cgroup filter)."""

    def __init__(self, match: re.Pattern | None = None, cgroup: str | None = None) -> None:
        self.match = match
        self.cgroup = cgroup.rstrip("/") if cgroup else None
        self.tracks: dict[int, ProcessTrack] = {}
        self.ended: list[ProcessTrack] = []
        self.tick_no = 0
        self.me = os.getpid()
        self._mount_fs: dict[str, set[str]] = {}  # mount namespace -> its memory-fs devices

    def _keep(self, pid: int, command: str, place: Placement) -> bool:
        if pid == self.me:
            return False
        if self.match is not None and not self.match.search(command):
            return False
        if self.cgroup is not None and not (
            place.cgroup == self.cgroup or place.cgroup.startswith(self.cgroup + "/")
        ):
            return False
        return True

    def _memory_fs(self, pid: int) -> set[str]:
        try:
            ns = os.readlink(PROC / str(pid) / "ns" / "mnt")
        except OSError:
            return set()
        devs = self._mount_fs.get(ns)
        if devs is None:
            from leakhunt.proc.shmem import memory_fs_devices  # noqa: PLC0415

            devs = self._mount_fs[ns] = memory_fs_devices(pid)
        return devs

    def tick(self, t: float) -> None:
        self.tick_no += 1
        seen = set()
        for entry in os.scandir(PROC):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            track = self.tracks.get(pid)
            status = _status(pid)
            if status is None:
                continue
            if track is None:
                command = _command(pid)
                place = placement(pid)
                if not self._keep(pid, command, place):
                    continue
                track = self.tracks[pid] = ProcessTrack(
                    pid, command, place, status.get("nspid", pid), tmpfs=self._memory_fs(pid)
                )
            seen.add(pid)
            if status["VmSize"] != track.vmsize or self.tick_no - track.maps_tick >= MAPS_EVERY:
                self._objects(track)
                track.vmsize = status["VmSize"]
                track.maps_tick = self.tick_no
            self._refresh(track)
            rss = status.get("VmRSS", 0)
            track.t.append(t)
            track.rss.append(rss)
            track.footprint.append(max(0, rss - status.get("RssShmem", 0)) + track.held)
        for pid in [p for p in self.tracks if p not in seen]:
            self.ended.append(self.tracks.pop(pid))

    def _objects(self, track: ProcessTrack) -> None:
        """The shmem-backed objects the process maps now (from maps: no page-table walk)."""
        try:
            with open(PROC / str(track.pid) / "maps", "rb") as f:
                lines = f.read().split(b"\n")
        except OSError:
            return
        found: dict = {}
        for line in lines:
            parts = line.split(None, 5)
            if len(parts) < 6:
                continue
            path = parts[5].decode("utf-8", "replace")
            dev = parts[3].decode()
            if not (_SHMEM_PATH.match(path) or dev in track.tmpfs):
                continue
            key = (dev, int(parts[4]))
            if key not in found:
                old = track.objects.get(key)
                found[key] = (
                    old if old is not None else [None, parts[0].decode(), -REFRESH_EVERY, kind_of(path)]
                )
        track.objects = found

    def _refresh(self, track: ProcessTrack) -> None:
        base = PROC / str(track.pid) / "map_files"
        total = 0
        for key, obj in track.objects.items():
            if obj[0] is None or (hash(key) + self.tick_no) % REFRESH_EVERY == 0:
                try:
                    obj[0] = os.stat(base / obj[1]).st_blocks * 512
                except OSError:
                    obj[0] = obj[0] or 0
                obj[2] = self.tick_no
            total += obj[0]
        track.held = total
