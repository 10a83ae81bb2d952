"""Reading `pmap -X` output (best effort) into the same Snapshot as smaps.

pmap -X prints one line per mapping with the smaps fields in kB, but names a mapping only by its
basename, so some classes must be guessed back: a shared mapping on a virtual filesystem (device
major 0) with an ordinary name is taken to be /dev/shm, ``zero (deleted)`` is /dev/zero, GPU
device names get their /dev prefix. Everything else classifies from the basename as usual.
"""

from __future__ import annotations

import re

import numpy as np

from leakhunt.errors import BadInput
from leakhunt.proc.smaps import Snapshot, _assemble

_GPU_NAMES = re.compile(r"^(nvidia[\w-]*|kfd)$")
_DRI_NAMES = re.compile(r"^(renderD\d+|card\d+)$")
_LIB = re.compile(r"\.so(\.[0-9][\w.]*)?$")
_ROW = re.compile(r"^\s*([0-9a-f]+)\s+(\S{4})\s+([0-9a-f]+)\s+([0-9a-f]+:[0-9a-f]+)\s+(\d+)\s+(.*)$")
_HEADER_FIELDS = ("Address", "Perm", "Offset", "Device", "Inode")


def looks_like_pmap(data: bytes) -> bool:
    head = data[:4096].decode(errors="replace").splitlines()
    return len(head) > 1 and head[1].split()[:5] == list(_HEADER_FIELDS)


def _path(name: str, perms: str, dev: str) -> str:
    if name == "[ anon ]":
        return ""
    if name.startswith("[") or name.startswith("memfd:") or name.startswith("anon_inode:"):
        return name
    if name.startswith("zero"):
        return "/dev/zero" + name[4:]
    if name.startswith("SYSV"):
        return "/" + name
    if _GPU_NAMES.match(name):
        return "/dev/" + name
    if _DRI_NAMES.match(name):
        return "/dev/dri/" + name
    virtual_fs = dev.split(":")[0].strip("0") == ""
    if perms[3:4] == "s" and virtual_fs and not _LIB.search(name):
        return "/dev/shm/" + name
    return name


def parse_pmap_x(data: bytes, source: str = "pmap -X") -> Snapshot:
    lines = data.decode("utf-8", "surrogateescape").splitlines()
    if len(lines) < 3 or lines[1].split()[:5] != list(_HEADER_FIELDS):
        raise BadInput(f"{source}: not `pmap -X` output (no 'Address Perm Offset Device Inode' header)")
    columns = lines[1].split()
    if columns[-1] != "Mapping" or "Size" not in columns:
        raise BadInput(f"{source}: unexpected pmap -X columns")
    names = tuple(columns[5:-1])
    kb = [n != "THPeligible" and n != "ProtectionKey" for n in names]
    rows = []
    finished = False
    for lineno, line in enumerate(lines[2:], 3):
        if line.strip().startswith("===="):
            finished = True
            break
        m = _ROW.match(line)
        if not m:
            raise BadInput(f"{source}: line {lineno}: not a pmap -X row: {line[:80]!r}")
        rest = m.group(6).split(None, len(names))
        numbers = rest[: len(names)]
        if len(rest) < len(names) or not all(x.isascii() and x.isdigit() and len(x) <= 15 for x in numbers):
            raise BadInput(f"{source}: line {lineno}: a short or damaged pmap -X row: {line[:80]!r}")
        rows.append(
            (
                m.groups()[:5],
                [int(x) for x in rest[: len(names)]],
                rest[len(names)] if len(rest) > len(names) else "",
            )
        )
    if not finished:
        raise BadInput(f"{source}: truncated (no totals line at the end)")
    n = len(rows)
    values = np.array([[v * 1024 if k else v for v, k in zip(r[1], kb)] for r in rows], np.int64).reshape(
        n, len(names)
    )
    size = values[:, names.index("Size")].astype(np.uint64)
    start = np.array([int(r[0][0], 16) for r in rows], np.uint64)
    perms = [r[0][1] for r in rows]
    devs = [r[0][3] for r in rows]
    paths = [_path(r[2], p, d) for r, p, d in zip(rows, perms, devs)]
    return _assemble(
        start,
        start + size,
        np.array([int(r[0][2], 16) for r in rows], np.uint64),
        np.array([int(r[0][4]) for r in rows], np.uint64),
        perms,
        devs,
        paths,
        names,
        values,
        [""] * n,
    )
