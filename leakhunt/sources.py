"""Where a snapshot can come from: a live pid, a saved smaps (plain or gzip), `pmap -X` output,
or a sample of a leakhunt recording (``DIR``, ``DIR@first``, ``DIR@last``, ``DIR@SEQ``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from leakhunt.errors import BadInput
from leakhunt.files import read_input
from leakhunt.proc.pmapx import looks_like_pmap, parse_pmap_x
from leakhunt.proc.smaps import Snapshot, parse_smaps, read_smaps
from leakhunt.proc.target import open_target


@dataclass(frozen=True)
class LoadedSnapshot:
    snapshot: Snapshot
    label: str  # what to call it in output: a path, "pid 123", "rec@last (t=42.0s)"
    kind: str  # "live", "smaps", "pmap -X", "recording"


def live(pid: int) -> LoadedSnapshot:
    open_target(pid)  # a zombie or a kernel thread is refused as every command refuses it
    return LoadedSnapshot(read_smaps(pid), f"pid {pid}", "live")


def load(spec: str | os.PathLike) -> LoadedSnapshot:
    """A snapshot from a file or a recorded sample; BadInput with one line when it can't be read."""
    spec = str(spec)
    base, at, which = spec.rpartition("@") if "@" in spec else (spec, "", "")
    if at and Path(base).is_dir():
        return _from_recording(Path(base), which)
    path = Path(spec)
    if path.is_dir():
        return _from_recording(path, "last")
    if not path.exists():
        raise BadInput(f"{spec}: no such file or recording")
    data = read_input(path)
    if not data.strip():
        raise BadInput(f"{spec}: empty file")
    if looks_like_pmap(data):
        return LoadedSnapshot(parse_pmap_x(data, spec), spec, "pmap -X")
    return LoadedSnapshot(parse_smaps(data, source=spec), spec, "smaps")


def _from_recording(directory: Path, which: str) -> LoadedSnapshot:
    from leakhunt.record import Recording

    rec = Recording.open(directory)
    stored = rec.snapshot_index()
    if not stored:
        raise BadInput(f"{directory}: the recording holds no full snapshot")
    if which in ("", "last"):
        seq, t, rel = stored[-1]
    elif which == "first":
        seq, t, rel = stored[0]
    elif which.isdigit():
        last = max((s["seq"] for s in rec.samples()), default=stored[-1][0])
        if int(which) > last:
            raise BadInput(f"{directory}@{which}: no such sample (the recording has samples 0 to {last})")
        earlier = [s for s in stored if s[0] <= int(which)]
        if not earlier:
            raise BadInput(
                f"{directory}: no snapshot at or before sample {which} "
                f"(snapshots at {', '.join(str(s[0]) for s in stored)})"
            )
        seq, t, rel = earlier[-1]
    else:
        raise BadInput(f"{directory}@{which}: say @first, @last or @SEQ (a sample number)")
    snap = parse_smaps(rec.snapshot_text(rel), source=f"{directory}@{seq}")
    return LoadedSnapshot(snap, f"{directory}@{seq} (t={t:.1f}s)", "recording")
