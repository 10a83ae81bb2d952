"""What grew: per (class, path) groups and per address range, robust to anonymous regions that
merge, split and move between samples.

Groups are the stable identity (all anonymous memory is one group, a library's mappings another);
address ranges answer "which bytes are new", which the correlator needs. A start address is never
assumed stable: growth of a range is what it holds now minus what the same *addresses* held before,
so a region that split in two or merged with its neighbour shows no growth, and a new region shows
all of its RSS as growth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from leakhunt.proc.classes import CLASSES, RegionClass
from leakhunt.proc.smaps import Snapshot

GroupKey = tuple[RegionClass, str]


@dataclass(frozen=True, slots=True)
class GroupStat:
    rss: int
    regions: int
    size: int
    pss: int


_DIGITS = re.compile(r"\d+")
#: A name's parts between separators; a part that is a number or a hex id (a pid, a counter, a
#: request's uuid piece) stands for any.
_PARTS = re.compile(r"[^-_./: ()]+")
_HEX_ID = re.compile(r"[0-9a-fA-F]*[0-9][0-9a-fA-F]*")
_SHM_CODE = CLASSES.index(RegionClass.SHM)


def shm_pattern(path: str) -> str:
    """'/dev/shm/sgl_shm_mm_8812_3' -> '/dev/shm/sgl_shm_mm_*_*': segments of one kind, one name.

    A server that leaks a segment per request has thousands of them; each its own group would
    rank below any single anonymous group however much they hold together. Numbers and hex ids
    ('cmpl-3f2acd9e') become '*'; digits inside a word ('buf1') too.
    """

    def part(m: re.Match) -> str:
        text = m.group(0)
        return "*" if _HEX_ID.fullmatch(text) else _DIGITS.sub("*", text)

    if path.startswith("/SYSV"):  # /SYSV<key in hex>: every key is one kind
        return "/SYSV*" + path[13:]
    return _PARTS.sub(part, path)


def group_path(code: int, path: str) -> str:
    return shm_pattern(path) if code == _SHM_CODE else path


def groups(snapshot: Snapshot) -> dict[GroupKey, GroupStat]:
    """RSS, region count, virtual size and PSS by (class, path); /dev/shm segments by name pattern.
    Groups are named once per distinct (class, path), in order of first appearance; the sums are
    numpy's (exact, int64)."""
    paths, width = snapshot.distinct_paths, max(len(snapshot.distinct_paths), 1)
    pairs, first, inverse = np.unique(
        snapshot.classes.astype(np.int64) * width + snapshot.path_ids, return_index=True, return_inverse=True
    )
    ids: dict[tuple[int, str], int] = {}
    group_of_pair = [0] * len(pairs)
    pair_list = pairs.tolist()
    for k in np.argsort(first, kind="stable").tolist():
        code, path_id = divmod(pair_list[k], width)
        group_of_pair[k] = ids.setdefault((code, group_path(code, paths[path_id])), len(ids))
    index = np.array(group_of_pair, np.intp)[inverse.reshape(-1)]
    sums = np.zeros((len(ids), 4), np.int64)
    for j, column in enumerate(
        (snapshot.rss, np.ones(len(index), np.int64), snapshot.end - snapshot.start, snapshot.column("Pss"))
    ):
        np.add.at(sums[:, j], index, np.asarray(column, np.int64))
    return {
        (CLASSES[code], path): GroupStat(*acc) for (code, path), acc in zip(ids, sums.tolist(), strict=True)
    }


def held_between(snapshot: Snapshot, lo: np.ndarray, hi: np.ndarray, field: str = "Rss") -> np.ndarray:
    """Bytes of ``field`` the snapshot holds inside each address range [lo, hi).

    A region only partly inside a range contributes in proportion to the overlap (smaps does not
    say which pages of a region are resident). Regions are sorted and disjoint, as the kernel
    prints them, so this is two binary searches per range.
    """
    starts = snapshot.start.astype(np.float64)
    ends = snapshot.end.astype(np.float64)
    values = snapshot.column(field).astype(np.float64)
    if len(starts) == 0:
        return np.zeros(len(lo))
    before = np.concatenate(([0.0], np.cumsum(values)))
    density = values / np.maximum(ends - starts, 1)

    def cumulative(x: np.ndarray) -> np.ndarray:
        k = np.searchsorted(starts, x, side="right") - 1
        kc = np.clip(k, 0, None)
        inside = np.clip(x - starts[kc], 0, ends[kc] - starts[kc])
        return np.where(k < 0, 0.0, before[kc] + density[kc] * inside)

    return cumulative(np.asarray(hi, np.float64)) - cumulative(np.asarray(lo, np.float64))


@dataclass(frozen=True)
class RangeGrowth:
    """Growth of each region of the later snapshot against the same addresses earlier."""

    snapshot: Snapshot  # the later snapshot; arrays below are aligned with its regions
    growth: np.ndarray  # bytes of RSS gained (negative: shrank)
    new: np.ndarray  # bool: no byte of this range was mapped before

    def top(self, n: int = 10) -> list[int]:
        order = np.argsort(-self.growth, kind="stable")
        return [int(i) for i in order[:n] if self.growth[i] > 0]


def range_growth(before: Snapshot, after: Snapshot) -> RangeGrowth:
    lo, hi = after.start, after.end
    held = held_between(before, lo, hi)
    mapped = held_between(before, lo, hi, field="Size")
    growth = after.rss.astype(np.float64) - held
    return RangeGrowth(after, np.rint(growth).astype(np.int64), mapped == 0)
