"""Shared memory held as objects: what a process keeps alive in tmpfs, not what it has touched.

A page of a /dev/shm file, a memfd, a SysV segment or a shared anonymous mapping is charged to
the memory cgroup (as shmem) from the moment any process writes it, but it counts in a process's
RSS only once *that* process has touched it. A receiver that maps hand-off buffers and never
reads them holds gigabytes with a flat RSS. So every shared object a process maps is measured as
an object: the pages the object itself has allocated (``st_blocks`` of the file behind the
mapping, read through ``/proc/PID/map_files``), each (device, inode) once however many mappings,
processes or mappers share it.

Measuring is a stat per object, which at ten thousand objects costs more than the smaps read it
rides on. Objects are re-measured when they are new, when this process's resident pages of them
changed, and otherwise in turn, one in ``REFRESH_EVERY`` per sample: an object filled only by
another process is seen within that many samples. bench/footprint.py measures the cost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from leakhunt.proc.classes import CLASSES, RegionClass
from leakhunt.proc.growth import shm_pattern
from leakhunt.proc.smaps import Snapshot
from leakhunt.proc.target import PROC

#: An object that neither appeared nor changed in this process is re-measured every this many samples.
REFRESH_EVERY = 8
#: Filesystems whose files are memory.
MEMORY_FS = frozenset({"tmpfs", "ramfs", "hugetlbfs", "devtmpfs"})

_SHM_CODES = np.array([CLASSES.index(RegionClass.SHM), CLASSES.index(RegionClass.PINNED)], np.uint8)
_FILE_CODE = CLASSES.index(RegionClass.FILE)
_DELETED = " (deleted)"


def kind_of(path: str) -> str:
    """What sort of shared object a mapping's path names."""
    if path.startswith("/dev/shm/"):
        return "dev-shm"
    if path.startswith(("memfd:", "/memfd:")):
        return "memfd"
    if path.startswith("/SYSV"):
        return "sysv"
    if path.startswith(("/dev/zero", "/anon_hugepage", "[anon_shmem:")):
        return "shared-anon"
    return "tmpfs"


def display_name(path: str) -> str:
    """'memfd:obj (deleted)' -> 'memfd:obj'; the deleted mark is a separate fact."""
    return path[: -len(_DELETED)] if path.endswith(_DELETED) else path


def object_pattern(path: str) -> str:
    """Objects of one kind share a pattern: '/dev/shm/torch_812_3 (deleted)' -> '/dev/shm/torch_*_*'."""
    return shm_pattern(display_name(path))


@dataclass(frozen=True, slots=True)
class ShmObject:
    """One shared object a process maps, measured as the object."""

    dev: str  # "00:01", as smaps prints it
    inode: int
    name: str  # the path without " (deleted)"
    kind: str  # dev-shm, tmpfs, memfd, sysv, shared-anon
    deleted: bool  # no name left: only mappings (and open descriptors) keep it alive
    bytes: int  # pages the object holds (st_blocks * 512)
    size: int  # its length (st_size), reserved but not necessarily allocated
    mapped: int  # bytes of it this process maps
    rss: int  # bytes of it resident in this process's page tables
    mappings: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.dev, self.inode)

    @property
    def pattern(self) -> str:
        return shm_pattern(self.name)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "deleted": self.deleted,
            "bytes": self.bytes,
            "size_bytes": self.size,
            "mapped_bytes": self.mapped,
            "rss_bytes": self.rss,
            "mappings": self.mappings,
            "dev": self.dev,
            "inode": self.inode,
        }


@dataclass(frozen=True, slots=True)
class Orphan:
    """A /dev/shm file that no process of the target maps."""

    name: str
    inode: int
    bytes: int
    size: int

    def to_json(self) -> dict:
        return {"name": self.name, "bytes": self.bytes, "size_bytes": self.size}


@dataclass(frozen=True)
class ShmTotals:
    """What a sample keeps of its held shared memory (and a recording gives back)."""

    bytes: int = 0
    rss: int = 0  # of those, resident in the process's page tables (its RSS counts these)
    objects: int = 0
    deleted_objects: int = 0
    orphans: int = 0
    orphan_bytes: int = 0

    def to_json(self) -> dict:
        return {
            "bytes": self.bytes,
            "objects": self.objects,
            "deleted_objects": self.deleted_objects,
            "rss_bytes": self.rss,
            "orphans": {"count": self.orphans, "bytes": self.orphan_bytes},
        }

    @classmethod
    def from_json(cls, d: object) -> ShmTotals | None:
        if not isinstance(d, dict):
            return None
        orphans = d.get("orphans") if isinstance(d.get("orphans"), dict) else {}
        try:
            return cls(
                int(d.get("bytes", 0)),
                int(d.get("rss_bytes", 0)),
                int(d.get("objects", 0)),
                int(d.get("deleted_objects", 0)),
                int(orphans.get("count", 0)),
                int(orphans.get("bytes", 0)),
            )
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True)
class HeldShm:
    """The shared objects one process (or a tree) keeps alive, each counted once, by column
    (a server with thousands of hand-off buffers has thousands of objects)."""

    dev: tuple[str, ...] = ()
    inode: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    path: tuple[str, ...] = ()  # as smaps prints it (with " (deleted)")
    held: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # st_blocks * 512
    size: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # st_size
    mapped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    resident: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mappings: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    orphans: tuple[Orphan, ...] = ()
    stale: int = 0  # objects whose size is from an earlier sample (not re-measured this time)
    # the snapshot's mappings of these objects: row index, and which object each maps
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    owner: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.path)

    def charge(self, snapshot: Snapshot) -> Snapshot:
        """The snapshot (the one this was measured from) with each object's mappings holding the
        object's pages instead of their resident ones: what the correlator attributes when it
        explains the footprint's growth rather than RSS's. An object's pages are spread over its
        mappings by size."""
        if not len(self.rows):
            return snapshot
        values = snapshot.values.copy()
        size = (snapshot.end[self.rows] - snapshot.start[self.rows]).astype(np.float64)
        share = size / np.maximum(self.mapped[self.owner], 1)
        charged = np.rint(self.held[self.owner] * share).astype(np.int64)
        names = snapshot.field_names
        # every page of an object is shared (a tree counts it once, by device, inode and offset)
        for name in ("Rss", "Shared_Dirty"):
            if name in names:
                values[self.rows, names.index(name)] = charged
        for name in ("Shared_Clean", "Private_Clean", "Private_Dirty"):
            if name in names:
                values[self.rows, names.index(name)] = 0
        return replace(snapshot, values=values)

    @property
    def bytes(self) -> int:
        return int(self.held.sum())

    @property
    def rss(self) -> int:
        """What the process's RSS already counts of these objects."""
        return int(self.resident.sum())

    @property
    def deleted_objects(self) -> int:
        return sum(1 for p in self.path if p.endswith(_DELETED))

    @property
    def orphan_bytes(self) -> int:
        return sum(o.bytes for o in self.orphans)

    def objects(self) -> list[ShmObject]:
        return [
            ShmObject(
                self.dev[i],
                int(self.inode[i]),
                display_name(p),
                kind_of(p),
                p.endswith(_DELETED),
                int(self.held[i]),
                int(self.size[i]),
                int(self.mapped[i]),
                int(self.resident[i]),
                int(self.mappings[i]),
            )
            for i, p in enumerate(self.path)
        ]

    def by_pattern(self) -> dict[str, tuple[int, int, int]]:
        """pattern -> (bytes, objects, deleted objects)."""
        out: dict[str, list[int]] = {}
        for p, b in zip(self.path, self.held.tolist()):
            acc = out.setdefault(object_pattern(p), [0, 0, 0])
            acc[0] += b
            acc[1] += 1
            acc[2] += p.endswith(_DELETED)
        return {k: (v[0], v[1], v[2]) for k, v in out.items()}

    def totals(self) -> ShmTotals:
        return ShmTotals(
            self.bytes, self.rss, len(self), self.deleted_objects, len(self.orphans), self.orphan_bytes
        )

    def to_json(self, top: int = 10) -> dict:
        patterns = sorted(self.by_pattern().items(), key=lambda kv: -kv[1][0])
        return {
            **self.totals().to_json(),
            "top": [
                {"pattern": p, "bytes": b, "objects": n, "deleted_objects": d}
                for p, (b, n, d) in patterns[:top]
            ],
            "orphan_files": [o.to_json() for o in sorted(self.orphans, key=lambda o: -o.bytes)[:top]],
        }

    @staticmethod
    def union(parts: list[HeldShm]) -> HeldShm:
        """Several processes' objects with each object once; its resident bytes the most any
        one process has (as the tree's RSS counts a shared page once)."""
        best: dict[tuple[str, int], tuple[int, int]] = {}  # key -> (part, row)
        for n, part in enumerate(parts):
            for i, (dev, ino) in enumerate(zip(part.dev, part.inode.tolist())):
                seen = best.get((dev, ino))
                if seen is None or part.resident[i] > parts[seen[0]].resident[seen[1]]:
                    best[(dev, ino)] = (n, i)
        rows = list(best.values())

        def col(name: str) -> np.ndarray:
            return np.array([getattr(parts[n], name)[i] for n, i in rows], np.int64)

        # a file one process of the tree maps is no orphan of the tree
        mapped = {ino for (dev, ino), (n, i) in best.items() if parts[n].path[i].startswith("/dev/shm/")}
        orphans: dict[int, Orphan] = {}
        for part in parts:
            for orphan in part.orphans:
                if orphan.inode not in mapped:
                    orphans.setdefault(orphan.inode, orphan)
        return HeldShm(
            tuple(parts[n].dev[i] for n, i in rows),
            col("inode"),
            tuple(parts[n].path[i] for n, i in rows),
            col("held"),
            col("size"),
            col("mapped"),
            col("resident"),
            col("mappings"),
            tuple(orphans.values()),
            sum(p.stale for p in parts),
        )


def memory_fs_devices(pid: int) -> set[str]:
    """'major:minor' of the tmpfs-like filesystems mounted in the target's mount namespace."""
    devs: set[str] = set()
    try:
        with open(PROC / str(pid) / "mountinfo", "rb") as f:
            for line in f:
                left, sep, right = line.partition(b" - ")
                if not sep:
                    continue
                fields = left.split()
                fstype = right.split(b" ", 1)[0].decode("ascii", "replace")
                if len(fields) > 2 and fstype in MEMORY_FS:
                    major, _, minor = fields[2].decode("ascii", "replace").partition(":")
                    devs.add(f"{int(major):02x}:{int(minor):02x}")
    except (OSError, ValueError):
        pass
    return devs


class ShmAccountant:
    """Measures the shared objects of one process, sample after sample (keeps the stat cache)."""

    def __init__(self, pid: int, dev_shm: Path | None = None, tmpfs: set[str] | None = None) -> None:
        self.pid = pid
        self.tmpfs = memory_fs_devices(pid) if tmpfs is None else tmpfs
        # the last measure: object keys (sorted), bytes, size, resident bytes when measured
        self._cache: tuple[np.ndarray, ...] = (np.zeros(0, np.int64),) * 4
        self._seq = 0
        self._fd: int | None = None  # /proc/PID/map_files, kept open: a stat relative to it is cheaper
        self.dev_shm = dev_shm if dev_shm is not None else PROC / str(pid) / "root" / "dev" / "shm"

    def rows(self, snap: Snapshot) -> np.ndarray:
        """Indices of the mappings that are shared objects held in memory."""
        mask = (snap.classes == _SHM_CODES[0]) | (snap.classes == _SHM_CODES[1])
        files = np.flatnonzero(snap.classes == _FILE_CODE)
        for i in files.tolist():
            if snap.dev[i] in self.tmpfs and snap.perms[i][3:4] == "s":
                mask[i] = True
        return np.flatnonzero(mask)

    def measure(self, snap: Snapshot, orphans: bool = False) -> HeldShm:
        seq = self._seq
        self._seq += 1
        rows = self.rows(snap)
        found = self.orphans(set()) if orphans and not len(rows) else ()
        if not len(rows):
            self._cache = (np.zeros(0, np.int64),) * 4
            return HeldShm(orphans=found)
        inode = snap.inode[rows].astype(np.int64)
        devs = [snap.dev[i] for i in rows.tolist()]
        codes = {d: n for n, d in enumerate(dict.fromkeys(devs))}
        # one object per (device, inode); an inode-less one (should not happen) is its own range
        key = np.where(inode > 0, inode, -snap.start[rows].astype(np.int64))
        key = key * len(codes) + np.array([codes[d] for d in devs], np.int64)
        keys, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        size = (snap.end[rows] - snap.start[rows]).astype(np.int64)
        rss = snap.rss[rows].astype(np.int64)
        mapped = np.bincount(inverse, weights=size, minlength=len(keys)).astype(np.int64)
        resident = np.bincount(inverse, weights=rss, minlength=len(keys)).astype(np.int64)
        mappings = np.bincount(inverse, minlength=len(keys)).astype(np.int64)
        held, length, stale = self._held(snap, rows[first], keys, resident, mapped, seq)
        obj_rows = rows[first].tolist()
        return HeldShm(
            tuple(snap.dev[i] for i in obj_rows),
            snap.inode[rows[first]].astype(np.int64),
            tuple(snap.path[i] for i in obj_rows),
            np.maximum(held, resident),
            length,
            mapped,
            resident,
            mappings,
            self.orphans(set(snap.inode[rows[first]].tolist())) if orphans else (),
            stale,
            rows.astype(np.int64),
            inverse.astype(np.int64),
        )

    def _held(
        self,
        snap: Snapshot,
        rows: np.ndarray,
        keys: np.ndarray,
        resident: np.ndarray,
        mapped: np.ndarray,
        seq: int,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """st_blocks and st_size of each object: stat the new, the changed and one in
        REFRESH_EVERY of the rest; the others keep their last measure."""
        held = np.zeros(len(keys), np.int64)
        length = mapped.copy()
        known = np.zeros(len(keys), bool)
        ckeys, cheld, csize, cres = self._cache
        if len(ckeys):
            at = np.minimum(np.searchsorted(ckeys, keys), len(ckeys) - 1)
            known = ckeys[at] == keys
            held[known] = cheld[at[known]]
            length[known] = csize[at[known]]
            fresh = known & (cres[at] == resident)
        else:
            fresh = known
        todo = np.flatnonzero(~fresh | ((keys + seq) % REFRESH_EVERY == 0))
        fd = self._dirfd() if len(todo) else None
        starts = snap.start[rows[todo]].tolist()
        ends = snap.end[rows[todo]].tolist()
        for j, a, b in zip(todo.tolist(), starts, ends):
            try:
                st = os.stat(f"{a:x}-{b:x}", dir_fd=fd) if fd is not None else None
            except OSError:  # unmapped since smaps was read
                st = None
            if st is not None:
                held[j], length[j] = st.st_blocks * 512, st.st_size
            elif not known[j]:  # what the mapping shows is all that is known
                held[j] = resident[j]
        self._cache = (keys, held, length, resident)
        return held, length, len(keys) - len(todo)

    def _dirfd(self) -> int | None:
        if self._fd is None:
            try:
                self._fd = os.open(PROC / str(self.pid) / "map_files", os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                return None
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def orphans(self, inodes: set[int]) -> tuple[Orphan, ...]:
        """/dev/shm files this process does not map (the tree and the host may; callers that know
        more narrow it down)."""
        out = []
        try:
            with os.scandir(self.dev_shm) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if not entry.is_file(follow_symlinks=False) or st.st_ino in inodes:
                        continue
                    out.append(Orphan(f"/dev/shm/{entry.name}", st.st_ino, st.st_blocks * 512, st.st_size))
        except OSError:
            return ()
        return tuple(out)


def mapped_anywhere(inodes: set[int], proc: Path = PROC) -> set[int]:
    """Which of these /dev/shm inodes some process on the host maps or holds open (costly: read
    at the end of a run, not every sample)."""
    found: set[int] = set()
    if not inodes:
        return found
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"{entry.path}/maps", "rb") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) > 4 and int(parts[4]) in inodes:
                        found.add(int(parts[4]))
            for fd in os.scandir(f"{entry.path}/fd"):
                try:
                    ino = fd.stat().st_ino
                except OSError:
                    continue
                if ino in inodes:
                    found.add(ino)
        except (OSError, ValueError):
            continue
    return found


def true_orphans(held: HeldShm, proc: Path = PROC) -> HeldShm:
    """``held`` with only the /dev/shm files that no process on the host maps or holds open."""
    if not held.orphans:
        return held
    used = mapped_anywhere({o.inode for o in held.orphans}, proc)
    return replace(held, orphans=tuple(o for o in held.orphans if o.inode not in used))
