"""The target's address space as the gdb backend needs it: which object maps an address, and the
bytes the object's file holds there (what a breakpoint covered, whatever gdb wrote since).

Files are opened through /proc/PID/map_files (the very file mapped, even deleted or in another
mount namespace) and fall back to /proc/PID/root/PATH, never to our own view of PATH.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

from leakhunt.errors import AccessDenied, TargetGone
from leakhunt.proc.smaps import parse_smaps
from leakhunt.proc.target import PROC, Target, proc_read


@dataclass(frozen=True, slots=True)
class Mapping:
    start: int
    end: int
    offset: int
    path: str
    perms: str = ""

    @property
    def is_file(self) -> bool:
        return self.path.startswith("/")

    @property
    def executable(self) -> bool:
        return "x" in self.perms


class AddressSpace:
    """A cached view of /proc/PID/maps, re-read when asked about an address it does not cover."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._mappings: list[Mapping] = []
        self._starts: list[int] = []
        self.refresh()

    def refresh(self) -> None:
        snapshot = parse_smaps(proc_read(self.target.pid, "maps"), source=f"/proc/{self.target.pid}/maps")
        self._mappings = [
            Mapping(int(s), int(e), int(o), p, perms)
            for s, e, o, p, perms in zip(
                snapshot.start.tolist(),
                snapshot.end.tolist(),
                snapshot.offset.tolist(),
                snapshot.path,
                snapshot.perms,
            )
        ]
        self._starts = [m.start for m in self._mappings]

    @property
    def mappings(self) -> list[Mapping]:
        return self._mappings

    def find(self, address: int, refresh: bool = True) -> Mapping | None:
        mapping = self._lookup(address)
        if mapping is None and refresh:
            try:
                self.refresh()
            except (TargetGone, AccessDenied):
                return None
            mapping = self._lookup(address)
        return mapping

    def _lookup(self, address: int) -> Mapping | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self._mappings[i].end:
            return self._mappings[i]
        return None

    def module_of(self, address: int) -> str | None:
        mapping = self.find(address)
        return mapping.path if mapping is not None and mapping.is_file else None

    def file_bytes(self, address: int, length: int) -> bytes | None:
        """What the mapped file holds at ``address`` (None for anonymous memory or unreadable files)."""
        mapping = self.find(address)
        if mapping is None or not mapping.is_file or address + length > mapping.end:
            return None
        file_offset = mapping.offset + (address - mapping.start)
        for path in (self.map_file(mapping), self.target_path(mapping.path)):
            try:
                with open(path, "rb") as f:
                    f.seek(file_offset)
                    data = f.read(length)
            except OSError:
                continue
            if len(data) == length:
                return data
        return None

    def map_file(self, mapping: Mapping) -> Path:
        return PROC / str(self.target.pid) / "map_files" / f"{mapping.start:x}-{mapping.end:x}"

    def target_path(self, path: str) -> Path:
        """``path`` as the target sees it (its mount namespace and chroot)."""
        return self.target.root / path.lstrip("/")
