"""Region classes: the one definition of what kind of memory a mapping is.

Every command, recording, report and exporter uses these names. The rules follow what each kind
of memory looks like in /proc/PID/smaps; the notable one is CUDA pinned host memory, which is a
*shared* mapping of ``/dev/zero (deleted)`` with ``Anonymous: 0 kB``: a classifier that calls only
path-less regions anonymous never sees a pinned-memory leak.
"""

from __future__ import annotations

import re
from enum import Enum


class RegionClass(str, Enum):
    HEAP = "heap"  # [heap]: brk-grown main arena
    STACK = "stack"  # [stack] (thread stacks are anonymous mappings to the kernel)
    ANON = "anon"  # private anonymous memory: mmap(MAP_ANONYMOUS), malloc arenas, pools
    FILE = "file"  # a mapped file that is not a shared object
    LIB = "lib"  # a shared object (code and data of a library)
    SHM = "shm"  # /dev/shm/*, memfd:*, SysV segments, shared anonymous memory
    GPU = "gpu"  # GPU driver mappings (/dev/nvidia*, /dev/dri/*, /dev/kfd)
    PINNED = "pinned"  # shared /dev/zero in a process with GPU driver mappings (CUDA pinned host memory)
    SPECIAL = "special"  # [vdso], [vvar], [vsyscall], other devices and kernel-provided mappings

    def __str__(self) -> str:
        return self.value


#: Classes in display order; also the integer codes used in columnar snapshots.
CLASSES: tuple[RegionClass, ...] = tuple(RegionClass)
CLASS_CODE: dict[RegionClass, int] = {c: i for i, c in enumerate(CLASSES)}

_GPU_DEVICE = re.compile(r"^/dev/(nvidia|dri/|kfd)")
_SHM_PATH = re.compile(r"^(/dev/shm/|/?memfd:|/SYSV[0-9a-fA-F]{8}|\[anon_shmem:)")
_SHARED_ZERO = re.compile(r"^/(dev/zero|anon_hugepage)( \(deleted\))?$")
_SHARED_OBJECT = re.compile(r"\.so(\.[0-9][\w.]*)?( \(deleted\))?$|/ld-linux[^/]*$")


def is_gpu_device(path: str) -> bool:
    return bool(_GPU_DEVICE.match(path))


def classify(path: str, perms: str, gpu_process: bool = False) -> RegionClass:
    """Class of one mapping from its pathname and permissions ('rw-s' is shared).

    ``gpu_process`` says whether the process has GPU driver mappings; it turns shared
    ``/dev/zero`` mappings from ``shm`` into ``pinned``.
    """
    if not path:
        return RegionClass.ANON
    if path[0] == "[":
        if path == "[heap]":
            return RegionClass.HEAP
        if path.startswith("[stack"):
            return RegionClass.STACK
        if path.startswith("[anon:"):  # named with prctl(PR_SET_VMA_ANON_NAME)
            return RegionClass.ANON
        if path.startswith("[anon_shmem:"):
            return RegionClass.SHM
        return RegionClass.SPECIAL
    shared = len(perms) > 3 and perms[3] == "s"
    if _SHARED_ZERO.match(path):
        if not shared:
            return RegionClass.ANON
        return RegionClass.PINNED if gpu_process and path.startswith("/dev/zero") else RegionClass.SHM
    if _SHM_PATH.match(path):
        return RegionClass.SHM
    if _GPU_DEVICE.match(path):
        return RegionClass.GPU
    if path.startswith("/dev/") or path.startswith("anon_inode:"):
        return RegionClass.GPU if "dmabuf" in path or "i915" in path else RegionClass.SPECIAL
    if _SHARED_OBJECT.search(path):
        return RegionClass.LIB
    return RegionClass.FILE
