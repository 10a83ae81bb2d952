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

from leakhunt.errors import LeakhuntError
from leakhunt.proc.shmem import ShmAccountant
from leakhunt.proc.smaps import Snapshot, parse_smaps
from leakhunt.proc.target import PROC, kb_fields, proc_read, read_cmdline

#: A process's address space is re-listed at least this often (ticks) even when VmSize is still.
MAPS_EVERY = 6
#: The counters a tick reads from /proc/PID/status.
NODE_FIELDS = ("VmSize", "VmRSS", "RssShmem")
#: Samples kept per process for its slope (older ones drop off).
WINDOW = 720
#: Pids of exited processes kept for the final document (top --json "ended").
MAX_ENDED = 1000

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
    """The kernel's memory counters; None for kernel threads and processes gone or not ours."""
    try:
        status = kb_fields(proc_read(pid, "status"), NODE_FIELDS)
    except LeakhuntError:
        return None
    return status if "VmSize" in status else None  # kernel threads have no memory


def _nspid(pid: int) -> int:
    """The pid inside the process's own pid namespace (the last of NSpid)."""
    try:
        for line in (PROC / str(pid) / "status").read_bytes().splitlines():
            if line.startswith(b"NSpid:"):
                return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return pid


def _command(pid: int) -> str:
    try:
        return read_cmdline(pid)
    except LeakhuntError:
        return ""


@dataclass
class ProcessTrack:
    pid: int
    command: str
    place: Placement
    nspid: int
    shm: ShmAccountant  # its shared objects, measured whole (as watch does, from maps here)
    t: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    rss: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    footprint: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    held: int = 0
    vmsize: int = -1
    maps_tick: int = -MAPS_EVERY
    maps: Snapshot | None = None  # the latest /proc/PID/maps (no page-table walk: no RSS fields)


class NodeSampler:
    """One tick looks at every process that passes ``keep`` (a command or cgroup filter)."""

    def __init__(self, match: re.Pattern | None = None, cgroup: str | None = None) -> None:
        self.match = match
        self.cgroup = cgroup.rstrip("/") if cgroup else None
        self.tracks: dict[int, ProcessTrack] = {}
        self.ended: deque[int] = deque(maxlen=MAX_ENDED)  # pids that exited, the latest ones
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
                    pid, command, place, _nspid(pid), ShmAccountant(pid, tmpfs=self._memory_fs(pid))
                )
            seen.add(pid)
            if status["VmSize"] != track.vmsize or self.tick_no - track.maps_tick >= MAPS_EVERY:
                self._maps(track)
                track.vmsize = status["VmSize"]
                track.maps_tick = self.tick_no
            if track.maps is not None:
                # new objects at once, the others one in REFRESH_EVERY ticks (ShmAccountant)
                track.held = track.shm.measure(track.maps).bytes
            rss = status.get("VmRSS", 0)
            track.t.append(t)
            track.rss.append(rss)
            track.footprint.append(max(0, rss - status.get("RssShmem", 0)) + track.held)
        for pid in [p for p in self.tracks if p not in seen]:
            self.tracks.pop(pid)
            self.ended.append(pid)

    def _maps(self, track: ProcessTrack) -> None:
        """The process's mappings now, from maps (no page-table walk)."""
        try:
            track.maps = parse_smaps(proc_read(track.pid, "maps"), source=f"/proc/{track.pid}/maps")
        except LeakhuntError:
            pass
