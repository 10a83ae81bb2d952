"""Growth tracking that survives anonymous regions splitting, merging and moving."""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
from conftest import SHARED_DATA

from leakhunt.proc.classes import CLASS_CODE, RegionClass
from leakhunt.proc.growth import GroupStat, group_path, groups, held_between, range_growth
from leakhunt.proc.smaps import load_smaps, read_smaps

MiB = 2**20
PAGE = mmap.PAGESIZE
PROT_NONE = 0  # not in Python's mmap module
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _anon(size: int) -> tuple[mmap.mmap, int]:
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.write(b"z" * size)
    return buf, ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _isolated(size: int) -> tuple[mmap.mmap, int]:
    """``size`` bytes of resident anonymous memory in a VMA of their own: a PROT_NONE page on each
    side keeps the kernel from merging them with a neighbour that is not all resident."""
    buf, addr = _anon(size + 2 * PAGE)
    assert libc.mprotect(addr, PAGE, PROT_NONE) == 0
    assert libc.mprotect(addr + PAGE + size, PAGE, PROT_NONE) == 0
    return buf, addr + PAGE


def test_a_region_that_splits_shows_no_growth():
    buf, addr = _isolated(16 * MiB)
    before = read_smaps(os.getpid())
    # Protect one page in the middle: the kernel splits the mapping in three.
    assert libc.mprotect(addr + 8 * MiB, PAGE, mmap.PROT_READ) == 0
    after = read_smaps(os.getpid())
    pieces = [i for i in range(len(after)) if addr <= after.start[i] < addr + 16 * MiB]
    assert len(pieces) == 3
    growth = range_growth(before, after)
    assert abs(int(growth.growth[pieces].sum())) <= PAGE
    assert not growth.new[pieces].any()
    del buf


def test_a_new_region_counts_all_its_rss_as_growth():
    before = read_smaps(os.getpid())
    buf, addr = _anon(12 * MiB)
    after = read_smaps(os.getpid())
    growth = range_growth(before, after)
    i = next(i for i in range(len(after)) if after.start[i] <= addr < after.end[i])
    assert growth.growth[i] >= 12 * MiB
    # The kernel may merge the new mapping into an anonymous neighbour; only alone is it "new".
    assert growth.new[i] == (after.end[i] - after.start[i] == 12 * MiB)
    assert i in growth.top(3)
    del buf


def test_held_between_apportions_partial_overlap():
    buf, addr = _isolated(8 * MiB)
    snap = read_smaps(os.getpid())
    lo = np.array([addr, addr + 2 * MiB, addr + 7 * MiB], np.uint64)
    hi = np.array([addr + 8 * MiB, addr + 4 * MiB, addr + 9 * MiB], np.uint64)
    held = held_between(snap, lo, hi)
    assert abs(held[0] - 8 * MiB) <= PAGE
    assert abs(held[1] - 2 * MiB) <= PAGE
    # Past the end: the guard page (not resident) and whatever lies beyond, which is not ours.
    assert held[2] >= 1 * MiB - PAGE
    del buf


def test_groups_sum_to_the_total():
    snap = read_smaps(os.getpid())
    g = groups(snap)
    assert sum(s.rss for s in g.values()) == snap.total_rss
    assert sum(s.regions for s in g.values()) == len(snap)
    assert (RegionClass.HEAP, "[heap]") in g or any(k[0] is RegionClass.ANON for k in g)


def test_groups_are_the_region_by_region_sums_in_order_of_first_appearance():
    # groups() names groups once per distinct (class, path) with numpy; this is the plain loop
    # over regions it must equal, on a real H100 + torch process and on this one.
    for snap in (load_smaps(SHARED_DATA / "smaps-h100-torch-pinned.txt"), read_smaps(os.getpid())):
        want: dict[tuple[RegionClass, str], list[int]] = {}
        for r in snap:
            acc = want.setdefault((r.klass, group_path(CLASS_CODE[r.klass], r.path)), [0, 0, 0, 0])
            for j, x in enumerate((r.rss, 1, r.size, r.pss)):
                acc[j] += x
        assert list(groups(snap).items()) == [(k, GroupStat(*v)) for k, v in want.items()]


def test_shm_segments_of_one_kind_are_one_group(tmp_path):
    import os as _os

    paths, maps = [], []
    try:
        for i in range(5):
            path = f"/dev/shm/lk_test_{_os.getpid()}_{i}"
            with open(path, "wb") as f:
                f.truncate(MiB)
            fd = _os.open(path, _os.O_RDWR)
            m = mmap.mmap(fd, MiB)
            _os.close(fd)
            m.write(b"s" * MiB)
            paths.append(path)
            maps.append(m)
        g = groups(read_smaps(_os.getpid()))
        key = (RegionClass.SHM, "/dev/shm/lk_test_*_*")
        assert key in g and g[key].regions == 5 and g[key].rss == 5 * MiB
    finally:
        for m in maps:
            m.close()
        for p in paths:
            _os.unlink(p)
