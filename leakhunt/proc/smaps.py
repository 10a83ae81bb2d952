"""Fast /proc/PID/smaps parser producing a columnar Snapshot.

A big inference server has tens of thousands of mappings and smaps repeats ~25 field lines for
each, so the hot path is a one-pass C parser (_smaps.c) that relies on the kernel printing the
same fields in the same order for every mapping. Text without that regular shape (a hand-edited
or foreign file, fields that differ between entries) and builds without a C compiler take the
line-by-line parser below, which gives the same result. Tests hold the two to each other;
bench/smaps.py measures the hot path against pmap -X, psutil and `cat`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from leakhunt import prefetch
from leakhunt.errors import BadInput
from leakhunt.files import read_input
from leakhunt.proc.classes import CLASS_CODE, CLASSES, RegionClass, classify, is_gpu_device
from leakhunt.proc.target import _smaps, proc_read  # _smaps: None without a C compiler (line parser)

_UPPER_A, _UPPER_Z = 65, 90
_HEADER = re.compile(
    rb"([0-9a-fA-F]{1,16})-([0-9a-fA-F]{1,16}) +(\S{4}) +([0-9a-fA-F]+) +([0-9a-fA-F]+:[0-9a-fA-F]+) +"
    rb"(\d+)(?: +(.*))?$"
)


@dataclass(frozen=True, slots=True)
class Region:
    """One mapping: a line of /proc/PID/maps plus its smaps fields (kB fields in bytes)."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str
    klass: RegionClass
    fields: Mapping[str, int] = field(default_factory=dict)
    vmflags: str = ""

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def rss(self) -> int:
        return self.fields.get("Rss", 0)

    @property
    def pss(self) -> int:
        return self.fields.get("Pss", 0)

    @property
    def anonymous(self) -> int:
        return self.fields.get("Anonymous", 0)

    @property
    def swap(self) -> int:
        return self.fields.get("Swap", 0)

    @property
    def shared(self) -> bool:
        return self.perms[3:4] == "s"


@dataclass(frozen=True, eq=False)
class Snapshot:
    """All mappings of one process at one instant, stored by column.

    ``values[i, j]`` is field ``field_names[j]`` of region ``i``: bytes for the fields the kernel
    prints in kB, the plain number otherwise (THPeligible, ProtectionKey).
    """

    start: np.ndarray  # uint64
    end: np.ndarray  # uint64
    offset: np.ndarray  # uint64
    inode: np.ndarray  # uint64
    perms: list[str]
    dev: list[str]
    path: list[str]
    field_names: tuple[str, ...]
    values: np.ndarray  # int64, (n, len(field_names))
    vmflags: Sequence[str]
    classes: np.ndarray  # uint8 codes into CLASSES
    gpu_process: bool
    path_ids: np.ndarray  # int32: path[i] == distinct_paths[path_ids[i]]
    distinct_paths: list[str]  # in order of first appearance

    def __len__(self) -> int:
        return len(self.path)

    def __getitem__(self, i: int) -> Region:
        return Region(
            int(self.start[i]),
            int(self.end[i]),
            self.perms[i],
            int(self.offset[i]),
            self.dev[i],
            int(self.inode[i]),
            self.path[i],
            CLASSES[self.classes[i]],
            dict(zip(self.field_names, self.values[i].tolist())),
            self.vmflags[i],
        )

    def __iter__(self) -> Iterator[Region]:
        return (self[i] for i in range(len(self)))

    def column(self, name: str) -> np.ndarray:
        """One field for every region (zeros when this kernel does not print it)."""
        try:
            return self.values[:, self.field_names.index(name)]
        except ValueError:
            return np.zeros(len(self), np.int64)

    @property
    def rss(self) -> np.ndarray:
        return self.column("Rss")

    @property
    def total_rss(self) -> int:
        return int(self.rss.sum())

    def total(self, name: str) -> int:
        return int(self.column(name).sum())

    def private(self) -> np.ndarray:
        """Each region's pages that no other process maps (USS, region by region)."""
        return self.column("Private_Clean") + self.column("Private_Dirty")

    def uss(self) -> int:
        return int(self.private().sum())

    def class_totals(self, name: str = "Rss") -> dict[RegionClass, int]:
        """Sum of one field by region class (every class present, zero when absent)."""
        sums = np.bincount(self.classes, weights=self.column(name), minlength=len(CLASSES))
        return {c: int(sums[i]) for i, c in enumerate(CLASSES)}


def read_smaps(pid: int) -> Snapshot:
    """One snapshot of a live process (TargetGone / AccessDenied as proc_read raises them)."""
    ahead = prefetch.take(pid, "smaps")
    raw, parsed = ahead if ahead is not None else (proc_read(pid, "smaps"), None)
    return parse_smaps(raw, source=f"/proc/{pid}/smaps", parsed=parsed)


def load_smaps(path: str | os.PathLike) -> Snapshot:
    """A saved smaps file (gzip allowed)."""
    return parse_smaps(read_input(path), source=str(path))


def parse_smaps(data: bytes, *, source: str = "smaps", parsed: object = None) -> Snapshot:
    """Parse smaps text (live or saved). Raises BadInput for text that is not smaps or is cut short.
    ``parsed``: the C parser's result for ``data`` when it ran already (leakhunt.prefetch)."""
    if not data or data.isspace():
        return _empty_snapshot()
    if not data.endswith(b"\n"):
        raise BadInput(f"{source}: truncated (the last line is incomplete)")
    fast = _parse_fast(data, parsed)
    if fast is not None:
        return fast
    return _parse_generic(data, source)


# -- the one-pass C parser ------------------------------------------------------------------------


def _parse_fast(data: bytes, parsed=None) -> Snapshot | None:
    """The C hot path (leakhunt/proc/_smaps.c); None when it is not built or the text is irregular.
    Its pass over the text runs without the GIL."""
    if _smaps is None:
        return None
    try:
        parsed = parsed or _smaps.parse(data)
    except ValueError:
        return None  # the line parser says precisely what is wrong
    if parsed is None:
        return None
    (names, values, start, end, offset, inode, perms, devs, paths, flag_text, flag_spans, perm_ids, distinct_perms,
     path_ids, distinct_paths) = parsed  # fmt: skip
    n = len(paths)
    table = np.frombuffer(values, np.int64).reshape(n, len(names))
    spans = np.frombuffer(flag_spans, np.int64).reshape(n, 2)
    flags: Sequence[str] = _Lines(flag_text, spans) if n and spans[0, 0] >= 0 else [""] * n
    return _assemble(
        np.frombuffer(start, np.uint64),
        np.frombuffer(end, np.uint64),
        np.frombuffer(offset, np.uint64),
        np.frombuffer(inode, np.uint64),
        perms,
        devs,
        paths,
        names,
        table,
        flags,
        (np.frombuffer(perm_ids, np.int32), distinct_perms),
        (np.frombuffer(path_ids, np.int32), distinct_paths),
    )


# -- headers and assembly -------------------------------------------------------------------------


def _assemble(
    start,
    end,
    offset,
    inode,
    perms: list[str],
    devs: list[str],
    paths: list[str],
    names: tuple[str, ...],
    values: np.ndarray,
    vmflags: Sequence[str],
    perm_index: tuple[np.ndarray, list[str]] | None = None,
    path_index: tuple[np.ndarray, list[str]] | None = None,
) -> Snapshot:
    """Classify every region (once per distinct path and permissions) and build the Snapshot.
    The indexes (ids into distinct strings) come from the C parser, or are built here."""
    perm_ids, distinct_perms = perm_index or distinct(perms)
    path_ids, distinct_paths = path_index or distinct(paths)
    gpu_process = any(is_gpu_device(p) for p in distinct_paths)
    n_perms = len(distinct_perms)
    pairs, inverse = np.unique(path_ids.astype(np.int64) * n_perms + perm_ids, return_inverse=True)
    code_of_pair = [
        CLASS_CODE[classify(distinct_paths[pair // n_perms], distinct_perms[pair % n_perms], gpu_process)]
        for pair in pairs.tolist()
    ]
    codes = np.array(code_of_pair, np.uint8)[inverse.reshape(-1)]
    return Snapshot(
        start=start,
        end=end,
        offset=offset,
        inode=inode,
        perms=perms,
        dev=devs,
        path=paths,
        field_names=names,
        values=values,
        vmflags=vmflags,
        classes=codes,
        gpu_process=gpu_process,
        path_ids=path_ids,
        distinct_paths=distinct_paths,
    )


def distinct(strings: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Each string's index into the distinct strings, which come in order of first appearance."""
    ids: dict[str, int] = {}
    row = [ids.setdefault(s, len(ids)) for s in strings]
    return np.array(row, np.int32), list(ids)


class _Lines(Sequence[str]):
    """Text fields decoded on access (most samples never look at VmFlags): the fields at (offset,
    length) ``spans`` of ``text``, which holds only them."""

    def __init__(self, text: bytes, spans: np.ndarray) -> None:
        self._text, self._starts = text, spans[:, 0].tolist()
        self._ends = (spans[:, 0] + spans[:, 1]).tolist()

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._text[self._starts[i] : self._ends[i]].strip().decode()


def _empty_snapshot() -> Snapshot:
    return _assemble(*(np.zeros(0, np.uint64),) * 4, [], [], [], (), np.zeros((0, 0), np.int64), [])


# -- the line-by-line path ------------------------------------------------------------------------


#: No size in smaps comes near this (1 EiB): a number past it is damage, and would overflow.
MAX_FIELD = 1 << 60


def _parse_generic(data: bytes, source: str) -> Snapshot:
    """Any smaps text: fields may differ between entries; missing fields read as zero."""
    header_starts: list[int] = []
    header_ends: list[int] = []
    entries: list[dict[str, int]] = []
    vmflags: list[str] = []
    names: dict[str, None] = {}
    pos = 0
    for lineno, line in enumerate(data.split(b"\n")[:-1], 1):
        line_start, pos = pos, pos + len(line) + 1
        if not line.strip():
            continue
        c = line[0]
        if not (_UPPER_A <= c <= _UPPER_Z):
            header_starts.append(line_start)
            header_ends.append(line_start + len(line))
            entries.append({})
            vmflags.append("")
            continue
        if not entries:
            raise BadInput(f"{source}: not smaps (a field line before the first mapping)")
        name, sep, rest = line.partition(b":")
        if not sep:
            raise BadInput(f"{source}: not smaps (line {line[:60]!r})")
        key = name.decode("ascii", "replace")
        rest = rest.strip()
        if key == "VmFlags":
            vmflags[-1] = rest.decode("ascii", "replace")
            continue
        number, _, unit = rest.partition(b" ")
        try:
            value = int(number)
        except ValueError:
            if unit.strip() == b"kB":  # a size that is not a number: damaged, not a new field
                raise BadInput(f"{source}: line {lineno}: {key}: {number[:20]!r} is not a number") from None
            continue  # a text field we do not know: keep going, as pmap does
        value = value * 1024 if unit == b"kB" else value
        if not 0 <= value < MAX_FIELD:
            raise BadInput(f"{source}: line {lineno}: {key}: {number[:20].decode()} is out of range")
        entries[-1][key] = value
        names.setdefault(key, None)
    if not header_starts:
        raise BadInput(f"{source}: not smaps (no mapping lines)")
    field_names = tuple(names)
    values = np.zeros((len(entries), len(field_names)), np.int64)
    index = {name: j for j, name in enumerate(field_names)}
    for i, fields in enumerate(entries):
        for key, value in fields.items():
            values[i, index[key]] = value
    rows = []
    for s, e in zip(header_starts, header_ends):
        m = _HEADER.match(data[s:e])
        if m is None:
            raise BadInput(f"{source}: not an smaps mapping line: {data[s:e][:80]!r}")
        rows.append(m.groups())
    text: dict[bytes, str] = {}  # interning: many mappings share a path

    def intern(b: bytes) -> str:
        return text.get(b) or text.setdefault(b, b.decode("utf-8", "surrogateescape"))

    return _assemble(
        np.array([int(r[0], 16) for r in rows], np.uint64),
        np.array([int(r[1], 16) for r in rows], np.uint64),
        np.array([int(r[3], 16) for r in rows], np.uint64),
        np.array([int(r[5]) for r in rows], np.uint64),
        [intern(r[2]) for r in rows],
        [intern(r[4]) for r in rows],
        [intern(r[6]) for r in rows],
        field_names,
        values,
        vmflags,
    )
