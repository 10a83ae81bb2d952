"""Reading files leakhunt is handed (saved smaps, pmap -X output, recordings' snapshots) with
limits: a regular file only, at most ``limit`` bytes read and at most ``limit`` bytes once
decompressed, in chunks so that Ctrl-C interrupts it. `maps /dev/zero` grew to 5 GB and a 4 MB
gzip bomb took 2 GB before these limits; now each is one line and exit 2.

``LEAKHUNT_MAX_INPUT`` (a size: 2GiB) raises the limit for a process with a truly huge smaps.
"""

from __future__ import annotations

import os
import stat
import zlib

from leakhunt.errors import BadInput
from leakhunt.units import format_bytes, parse_size

#: 512 MiB: a smaps of 500k mappings, ten times what a large inference server has.
DEFAULT_LIMIT = 512 << 20
_CHUNK = 1 << 20


def input_limit() -> int:
    raw = os.environ.get("LEAKHUNT_MAX_INPUT")
    if not raw:
        return DEFAULT_LIMIT
    try:
        return int(parse_size(raw))
    except ValueError as e:
        raise BadInput(f"LEAKHUNT_MAX_INPUT={raw}: {e}") from None


def read_input(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """The bytes of a regular file, gunzipped when it is gzip; BadInput saying why not."""
    limit = input_limit() if limit is None else limit
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise BadInput(f"{path}: not a regular file")
            data = _read_capped(f, limit, path)
    except OSError as e:
        raise BadInput(f"{path}: {e.strerror}") from None
    if data[:2] == b"\x1f\x8b":
        data = gunzip(data, limit, path)
    return data


def _read_capped(f, limit: int, path) -> bytes:
    chunks, total = [], 0
    while chunk := f.read(_CHUNK):
        total += len(chunk)
        if total > limit:
            raise BadInput(f"{path}: larger than {format_bytes(limit)} (LEAKHUNT_MAX_INPUT raises the limit)")
        chunks.append(chunk)
    return b"".join(chunks)


def gunzip(data: bytes, limit: int | None = None, path: object = "data") -> bytes:
    """Decompress gzip data, refusing more than ``limit`` bytes of output and corrupt streams."""
    limit = input_limit() if limit is None else limit
    d = zlib.decompressobj(wbits=31)
    out, total = [], 0
    pending = data
    try:
        while pending and not d.eof:
            # At most a chunk of output at a time: what it could not take waits in unconsumed_tail.
            chunk = d.decompress(pending, _CHUNK)
            pending = d.unconsumed_tail
            total += len(chunk)
            if total > limit:
                raise BadInput(
                    f"{path}: decompresses to more than {format_bytes(limit)} (LEAKHUNT_MAX_INPUT raises the limit)"
                )
            out.append(chunk)
    except zlib.error as e:
        raise BadInput(f"{path}: corrupt gzip data ({e})") from None
    if not d.eof:
        raise BadInput(f"{path}: corrupt gzip data (cut short)")
    return b"".join(out)
