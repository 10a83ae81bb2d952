"""Fast /proc/PID/smaps parser producing a columnar Snapshot.

A big inference server has tens of thousands of mappings and smaps repeats ~25 field lines for
each, so the hot path is vectorised with numpy: the kernel prints the same fields in the same
order for every mapping, which lets every number be decoded at once from fixed positions relative
to the line ends. Text that does not have that regular shape (a hand-edited file, an older kernel
with optional fields) falls back to a line-by-line parser that gives the same result. Both are
tested against each other; bench/smaps.py measures the hot path against pmap -X and `cat`.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from leakhunt.errors import BadInput
from leakhunt.proc.target import proc_read
from leakhunt.proc.classes import CLASS_CODE, CLASSES, RegionClass, classify, is_gpu_device

_NL, _COLON, _SPACE = 10, 58, 32
_UPPER_A, _UPPER_Z = 65, 90
_MAX_DIGITS = 20
_HEADER = re.compile(rb"[0-9a-f]+-[0-9a-f]+ +\S{4} +[0-9a-f]+ +[0-9a-f]+:[0-9a-f]+ +\d+( |$)")


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

    start: np.ndarray          # uint64
    end: np.ndarray            # uint64
    offset: np.ndarray         # uint64
    inode: np.ndarray          # uint64
    perms: list[str]
    dev: list[str]
    path: list[str]
    field_names: tuple[str, ...]
    values: np.ndarray         # int64, (n, len(field_names))
    vmflags: Sequence[str]
    classes: np.ndarray        # uint8 codes into CLASSES
    gpu_process: bool

    def __len__(self) -> int:
        return len(self.path)

    def __getitem__(self, i: int) -> Region:
        return Region(
            int(self.start[i]), int(self.end[i]), self.perms[i], int(self.offset[i]), self.dev[i],
            int(self.inode[i]), self.path[i], CLASSES[self.classes[i]],
            dict(zip(self.field_names, self.values[i].tolist())), self.vmflags[i],
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

    def class_totals(self, name: str = "Rss") -> dict[RegionClass, int]:
        """Sum of one field by region class (every class present, zero when absent)."""
        sums = np.bincount(self.classes, weights=self.column(name), minlength=len(CLASSES))
        return {c: int(sums[i]) for i, c in enumerate(CLASSES)}


def read_smaps(pid: int) -> Snapshot:
    """One snapshot of a live process (TargetGone / AccessDenied as proc_read raises them)."""
    return parse_smaps(proc_read(pid, "smaps"), source=f"/proc/{pid}/smaps")


def load_smaps(path: str | os.PathLike) -> Snapshot:
    """A saved smaps file (gzip allowed)."""
    data = _read_file(path)
    return parse_smaps(data, source=str(path))


def _read_file(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadInput(f"{path}: {e.strerror}") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise BadInput(f"{path}: corrupt gzip data ({e})") from None
    return data


def parse_smaps(data: bytes, *, source: str = "smaps") -> Snapshot:
    """Parse smaps text (live or saved). Raises BadInput for text that is not smaps or is cut short."""
    if not data or data.isspace():
        return _empty_snapshot()
    if not data.endswith(b"\n"):
        raise BadInput(f"{source}: truncated (the last line is incomplete)")
    fast = _parse_regular(data)
    if fast is not None:
        return fast
    return _parse_generic(data, source)


# -- the vectorised path --------------------------------------------------------------------------

def _parse_regular(data: bytes) -> Snapshot | None:
    """Parse smaps whose entries all have the same fields in the same order; None if they don't."""
    buf = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(buf == _NL)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    first = buf[starts]
    is_field = (first >= _UPPER_A) & (first <= _UPPER_Z)
    headers = np.flatnonzero(~is_field)
    n = len(headers)
    if n == 0 or len(ends) % n:
        return None
    per_entry = len(ends) // n
    if per_entry < 2 or headers[0] != 0 or not np.array_equal(headers, np.arange(n) * per_entry):
        return None

    # Field names and kinds come from the first entry; every other entry must agree.
    names: list[str] = []
    kinds: list[str] = []  # 'kB', 'num' or 'text'
    for line in data[starts[1]:ends[per_entry - 1] + 1].splitlines():
        name, sep, rest = line.partition(b":")
        if not sep:
            return None
        rest = rest.strip()
        names.append(name.decode())
        kinds.append("kB" if rest.endswith(b" kB") else "num" if rest.isdigit() else "text")
    field_starts = starts.reshape(n, per_entry)[:, 1:]
    for j, name in enumerate(names):
        col = field_starts[:, j]
        if not (np.all(buf[col + len(name)] == _COLON) and np.all(buf[col] == buf[col[0]])):
            return None

    field_ends = ends.reshape(n, per_entry)[:, 1:]
    numeric = [j for j, k in enumerate(kinds) if k != "text"]
    kb_cols = np.array([kinds[j] == "kB" for j in numeric])
    line_ends = field_ends[:, numeric]  # (n, k) positions of '\n'
    if kb_cols.any() and not np.all(buf[line_ends[:, kb_cols] - 1] == ord("B")):
        return None
    last_digit = line_ends - np.where(kb_cols, 4, 1)
    values = _decode_numbers(buf, last_digit.ravel()).reshape(line_ends.shape)
    values[:, kb_cols] *= 1024

    text_cols = [j for j, k in enumerate(kinds) if k == "text"]
    vmflags: Sequence[str] = [""] * n
    if "VmFlags" in names and kinds[names.index("VmFlags")] == "text":
        j = names.index("VmFlags")
        vmflags = _Lines(data, (field_starts[:, j] + len("VmFlags:")).tolist(), field_ends[:, j].tolist())
    elif text_cols:
        return None

    header_starts = starts[headers].tolist()
    header_ends = ends[headers].tolist()
    return _build(data, header_starts, header_ends, tuple(names[j] for j in numeric), values, vmflags)


def _decode_numbers(buf: np.ndarray, last_digit: np.ndarray) -> np.ndarray:
    """Decimal numbers that end at the given positions, decoded all at once, right to left."""
    values = np.zeros(len(last_digit), np.int64)
    live = np.ones(len(last_digit), bool)
    scale = 1
    for k in range(_MAX_DIGITS):
        digit = buf[last_digit - k].astype(np.int64) - 48
        live &= (digit >= 0) & (digit <= 9)
        if not live.any():
            break
        values += np.where(live, digit, 0) * scale
        scale *= 10
    return values


# -- headers and assembly -------------------------------------------------------------------------

def _build(data: bytes, header_starts: list[int], header_ends: list[int], names: tuple[str, ...],
           values: np.ndarray, vmflags: Sequence[str]) -> Snapshot:
    try:
        parts = [data[s:e].split(None, 5) for s, e in zip(header_starts, header_ends)]
        ranges = [p[0].split(b"-") for p in parts]
        start = np.array([int(r[0], 16) for r in ranges], np.uint64)
        end = np.array([int(r[1], 16) for r in ranges], np.uint64)
        offset = np.array([int(p[2], 16) for p in parts], np.uint64)
        inode = np.array([int(p[4]) for p in parts], np.uint64)
    except (ValueError, IndexError):
        bad = next(data[s:e] for s, e in zip(header_starts, header_ends) if not _HEADER.match(data[s:e]))
        raise BadInput(f"not an smaps mapping line: {bad[:80]!r}") from None
    # Interning: tens of thousands of mappings share a few hundred distinct strings.
    text: dict[bytes, str] = {}
    perms = [text.get(p[1]) or text.setdefault(p[1], p[1].decode()) for p in parts]
    devs = [text.get(p[3]) or text.setdefault(p[3], p[3].decode()) for p in parts]
    raw_paths = [p[5] if len(p) > 5 else b"" for p in parts]
    paths = [text.get(b) or text.setdefault(b, b.decode("utf-8", "surrogateescape")) for b in raw_paths]
    gpu_process = any(is_gpu_device(p) for p in set(paths))
    cache: dict[tuple[str, str], int] = {}
    codes = np.fromiter(
        (cache[key] if key in cache else cache.setdefault(key, CLASS_CODE[classify(*key, gpu_process)])
         for key in zip(paths, perms)),
        np.uint8, count=len(paths))
    return Snapshot(start, end, offset, inode, perms, devs, paths, names, values, vmflags, codes,
                    gpu_process)


class _Lines(Sequence[str]):
    """Text fields decoded on access: most samples never look at VmFlags."""

    def __init__(self, data: bytes, starts: list[int], ends: list[int]) -> None:
        self._data, self._starts, self._ends = data, starts, ends

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._data[self._starts[i]:self._ends[i]].strip().decode()


def _empty_snapshot() -> Snapshot:
    z = np.zeros(0, np.uint64)
    return Snapshot(z, z, z, z, [], [], [], (), np.zeros((0, 0), np.int64), [], np.zeros(0, np.uint8),
                    False)


# -- the line-by-line path ------------------------------------------------------------------------

def _parse_generic(data: bytes, source: str) -> Snapshot:
    """Any smaps text: fields may differ between entries; missing fields read as zero."""
    header_starts: list[int] = []
    header_ends: list[int] = []
    entries: list[dict[str, int]] = []
    vmflags: list[str] = []
    names: dict[str, None] = {}
    pos = 0
    for line in data.split(b"\n")[:-1]:
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
        key = name.decode()
        rest = rest.strip()
        if key == "VmFlags":
            vmflags[-1] = rest.decode()
            continue
        number, _, unit = rest.partition(b" ")
        try:
            value = int(number)
        except ValueError:
            continue  # a text field we do not know: keep going, as pmap does
        entries[-1][key] = value * 1024 if unit == b"kB" else value
        names.setdefault(key, None)
    if not header_starts:
        raise BadInput(f"{source}: not smaps (no mapping lines)")
    field_names = tuple(names)
    values = np.zeros((len(entries), len(field_names)), np.int64)
    index = {name: j for j, name in enumerate(field_names)}
    for i, fields in enumerate(entries):
        for key, value in fields.items():
            values[i, index[key]] = value
    return _build(data, header_starts, header_ends, field_names, values, vmflags)
