"""Session recordings: one directory per run, append-only, readable after a crash.

Layout of a session directory::

    session.json           who, what, when: written once at the start (atomically)
    samples.jsonl          one line per smaps sample: totals, classes, groups
    snapshots/NNNNNN.smaps.gz   full smaps text of chosen samples (written atomically)
    events.jsonl           traced mmap/munmap/... events (trace-mmap, investigate)
    <stream>.jsonl         any other stream a command adds (ledger, stacks, notes, ...)
    summary.json           written at a clean end; its absence means leakhunt or the host died

Every line is written with a single write(2) on an O_APPEND descriptor and no user-space
buffering, so a crash of leakhunt loses nothing that was written; at worst a crash of the
machine cuts the last line short, and the reader drops a truncated last line with a note.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leakhunt import __version__
from leakhunt.errors import BadInput, CorruptRecording
from leakhunt.files import gunzip
from leakhunt.proc.sampler import charge_record

FORMAT_VERSION = 1
SESSION = "session.json"
SUMMARY = "summary.json"
SAMPLES = "samples"
LOCK = ".lock"
#: What every sample record must hold, numbers all (the rest is optional).
SAMPLE_KEYS = ("seq", "t", "rss")
EVENTS = "events"
NOTES = "notes"
TREE = "tree"
SNAPSHOTS = "snapshots"


def _dumps(record: Any) -> bytes:
    return json.dumps(record, separators=(",", ":"), default=_default).encode() + b"\n"


def _default(obj: Any) -> Any:
    if hasattr(obj, "to_record"):
        return obj.to_record()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "value"):  # enums
        return obj.value
    raise TypeError(f"cannot record {type(obj).__name__}")


def _lines(path: Path) -> list[bytes]:
    try:
        return path.read_bytes().splitlines()
    except OSError:
        return []


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _naming(e, path) from None


def _naming(e: OSError, path: Path) -> OSError:
    """The error with the file it was about (a write's ENOSPC names none): one line says where."""
    return e if e.filename else OSError(e.errno, e.strerror, str(path))


class SessionWriter:
    """Appends records to a session directory. Safe to use from several threads.

    One writer at a time: a lock (``.lock``, flock'ed for the writer's life) stops a second one.
    A directory that holds a recording already is refused unless ``append``: the run is then a
    new session of it (its number in ``self.session``), whose snapshots and samples are kept apart
    from the first session's, so nothing is overwritten or mixed."""

    def __init__(
        self,
        directory: str | os.PathLike,
        command: str,
        meta: dict[str, Any] | None = None,
        append: bool = False,
    ) -> None:
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / SNAPSHOTS).mkdir(exist_ok=True)
            self._lock = os.open(self.dir / LOCK, os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError as e:
            raise BadInput(f"cannot create recording directory {self.dir}: {e.strerror}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock)
            raise BadInput(f"{self.dir}: another leakhunt is recording into it") from None
        exists = (self.dir / SESSION).exists()
        if exists and not append:
            os.close(self._lock)
            raise BadInput(
                f"{self.dir} holds a recording already: choose a new directory, or --append to add "
                "this run to it as a new session"
            )
        self._fds: dict[str, int] = {}
        # The first session has no note; each one appended later left a "joined" note.
        joined = sum(1 for n in _lines(self.dir / f"{NOTES}.jsonl") if b'"joined"' in n)
        self.session = 2 + joined if exists else 1
        session = {
            "format": FORMAT_VERSION,
            "tool": f"leakhunt {__version__}",
            "command": command,
            "argv": sys.argv,
            "started": time.time(),
            "host": socket.gethostname(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            **(meta or {}),
        }
        if exists:
            # A second command recording into the same session (trace-mmap after watch, say):
            # the session stays the first one's; this one is noted, with its number.
            self.append(
                NOTES, {"ts": time.time(), "note": "joined", "session": {**session, "number": self.session}}
            )
        else:
            _write_atomic(self.dir / SESSION, json.dumps(session, indent=2, default=_default).encode())

    def append(self, stream: str, record: Any) -> None:
        self.append_many(stream, (record,))

    def append_many(self, stream: str, records: Iterable[Any]) -> None:
        if self.session > 1 and stream == SAMPLES:  # kept apart from the first session's
            records = ({**r, "session": self.session} if isinstance(r, dict) else r for r in records)
        data = b"".join(_dumps(r) for r in records)
        if not data:
            return
        fd = self._fds.get(stream)
        if fd is None:
            fd = self._fds[stream] = os.open(
                self.dir / f"{stream}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
            )
        view = memoryview(data)
        try:
            while view:  # O_APPEND writes of regular files are whole, but be correct if one is not
                n = os.write(fd, view)
                view = view[n:]
        except OSError as e:
            raise _naming(e, self.dir / f"{stream}.jsonl") from None

    def note(self, text: str, **extra: Any) -> None:
        self.append(NOTES, {"ts": time.time(), "note": text, **extra})

    def snapshot(self, seq: int, smaps_text: bytes, pid: int | None = None) -> str:
        """Store raw smaps text for sample ``seq`` (of ``pid``, in a recording of several
        processes); returns its path relative to the session."""
        rel = f"{SNAPSHOTS}/{seq:06d}.smaps.gz" if pid is None else f"{SNAPSHOTS}/{pid}-{seq:06d}.smaps.gz"
        if self.session > 1:  # an appended session never overwrites the first one's
            rel = rel.replace(f"{SNAPSHOTS}/", f"{SNAPSHOTS}/s{self.session}-")
        _write_atomic(self.dir / rel, gzip.compress(smaps_text, compresslevel=1))
        return rel

    def finish(self, summary: dict[str, Any]) -> None:
        _write_atomic(
            self.dir / SUMMARY,
            json.dumps({"finished": time.time(), **summary}, indent=2, default=_default).encode(),
        )
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._lock is not None:
            os.close(self._lock)  # and with it the flock
            self._lock = None

    def __enter__(self) -> SessionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Recording:
    """A session directory read back."""

    dir: Path
    session: dict[str, Any]
    summary: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)  # truncated lines and the like

    @classmethod
    def open(cls, directory: str | os.PathLike) -> Recording:
        d = Path(directory)
        if not d.is_dir():
            raise CorruptRecording(f"{d}: not a directory")
        try:
            session = json.loads((d / SESSION).read_text())
        except FileNotFoundError:
            raise CorruptRecording(f"{d}: not a leakhunt recording (no {SESSION})") from None
        except (OSError, ValueError) as e:
            raise CorruptRecording(f"{d / SESSION}: unreadable ({e})") from None
        if not isinstance(session, dict) or session.get("format") != FORMAT_VERSION:
            raise CorruptRecording(f"{d / SESSION}: unknown recording format {session.get('format')!r}")
        summary = None
        if (d / SUMMARY).exists():
            try:
                summary = json.loads((d / SUMMARY).read_text())
            except ValueError as e:
                raise CorruptRecording(f"{d / SUMMARY}: unreadable ({e})") from None
        return cls(d, session, summary)

    @property
    def complete(self) -> bool:
        """False when leakhunt (or the machine) died before the end of the run."""
        return self.summary is not None

    def streams(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.jsonl"))

    def records(self, stream: str) -> Iterator[dict[str, Any]]:
        """Every record of a stream. A line that is not a JSON object (cut short by a crash,
        damaged, or not leakhunt's) is skipped and said in ``problems``: one bad line never
        makes a recording unreadable."""
        path = self.dir / f"{stream}.jsonl"
        if not path.exists():
            return
        try:
            with open(path, "rb") as f:
                lines = f.read().split(b"\n")
        except OSError as e:
            raise CorruptRecording(f"{path}: unreadable ({e.strerror or e})") from None
        last = len(lines) - 1
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
                if i == last:  # no newline after it: the write was cut short
                    self._problem(f"{path.name}: dropped a truncated last line")
                    continue
            if not isinstance(record, dict):
                self._problem(f"{path.name}: line {i + 1} is not a JSON object: skipped")
                continue
            yield record

    def _problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)

    def samples(self, pid: int | None = None) -> list[dict[str, Any]]:
        """Samples of one process: ``pid``, or the session's own pid in a recording of a tree.
        A sample without its sequence number, time or RSS is skipped and said in ``problems``."""
        records = []
        for r in self.records(SAMPLES):
            if r.get("session", 1) != 1:  # a session appended later: its own run, not this one's
                continue
            if all(
                isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for k in SAMPLE_KEYS
            ):
                records.append(r)
            else:
                self._problem(f"{SAMPLES}.jsonl: a sample without {'/'.join(SAMPLE_KEYS)}: skipped")
        want = pid if pid is not None else self.session.get("pid")
        if want is None:
            return records
        return [r for r in records if r.get("pid", want) == want]

    def pids(self) -> list[int]:
        """Every process that has samples, the session's own first."""
        seen = dict.fromkeys([self.session.get("pid")] + [r.get("pid") for r in self.records(SAMPLES)])
        return [p for p in seen if p is not None]

    def snapshot_index(self, pid: int | None = None) -> list[tuple[int, float, str]]:
        """(seq, t, path) of every full snapshot of one process (default: the session's pid)."""
        t_of = {s["seq"]: s["t"] for s in self.samples(pid)}
        want = pid if pid is not None else self.session.get("pid")
        index = {s["seq"]: (s["seq"], s["t"], s["snapshot"]) for s in self.samples(pid) if s.get("snapshot")}
        for r in self.records(SNAPSHOTS):
            if r.get("pid", want) == want:
                index[r["seq"]] = (r["seq"], r.get("t", t_of.get(r["seq"], 0.0)), r["snapshot"])
        return sorted(index.values())

    def notes(self) -> list[dict[str, Any]]:
        return list(self.records(NOTES))

    def snapshot_text(self, rel: str) -> bytes:
        try:
            return gunzip((self.dir / rel).read_bytes(), path=self.dir / rel)
        except OSError as e:
            raise CorruptRecording(f"{self.dir / rel}: unreadable ({e.strerror or e})") from None
        except BadInput as e:
            raise CorruptRecording(str(e)) from None

    # -- pandas views ----------------------------------------------------------------------------

    def samples_frame(self, pid: int | None = None):
        """One row per sample: t, ts, rss, and one column per class (bytes)."""
        import pandas as pd

        rows = []
        for s in self.samples(pid):
            row = {"seq": s["seq"], "t": s["t"], "ts": s["ts"], "pid": s.get("pid"), "rss": s["rss"]}
            row.update({f"class_{k}": v for k, v in s.get("classes", {}).items()})
            rows.append(row)
        return pd.DataFrame(rows)

    def groups_frame(self, pid: int | None = None):
        """Long format: one row per (sample, group): t, class, path, rss, regions."""
        import pandas as pd

        rows = [
            (s["seq"], s["t"], g[0], g[1], g[2], g[3]) for s in self.samples(pid) for g in s.get("groups", [])
        ]
        return pd.DataFrame(rows, columns=["seq", "t", "class", "path", "rss", "regions"])

    def frame(self, stream: str):
        import pandas as pd

        return pd.DataFrame(list(self.records(stream)))


class SampleRecorder:
    """Writes a sampler's samples into a session: every sample's totals, the full smaps text of
    the first sample, then one every ``snapshot_every`` seconds, and of the last one at the end."""

    def __init__(self, writer: SessionWriter, snapshot_every: float = 30.0, pid: int | None = None) -> None:
        self.writer = writer
        self.snapshot_every = snapshot_every
        self.pid = pid  # set when several processes share the recording
        self._last_snapshot_t: float | None = None
        self._pending = None  # the latest sample whose snapshot was not written

    def __call__(self, sample, history=None) -> None:
        rel = None
        due = self._last_snapshot_t is None or sample.t - self._last_snapshot_t >= self.snapshot_every
        if due and sample.raw is not None:
            rel = self.writer.snapshot(sample.seq, sample.raw, self.pid)
            self._last_snapshot_t = sample.t
            self._pending = None
        else:
            self._pending = sample
        self.writer.append(SAMPLES, sample.to_record(rel))

    def flush_last(self) -> None:
        """Write the snapshot of the latest sample (call once at the end of the run)."""
        sample, self._pending = self._pending, None
        if sample is not None and sample.raw is not None:
            rel = self.writer.snapshot(sample.seq, sample.raw, self.pid)
            self.writer.append(
                SNAPSHOTS, {"seq": sample.seq, "t": sample.t, "pid": sample.pid, "snapshot": rel}
            )


class TreeRecorder:
    """Writes a TreeSampler's ticks (its on_tick) into a session: each process's samples through
    its own SampleRecorder, and, when the sampler follows a tree, the tree's totals as the ``tree``
    stream (a tree of one's totals are its process's samples)."""

    def __init__(self, writer: SessionWriter, follow: bool) -> None:
        self.writer = writer
        self.follow = follow  # a followed tree: its totals are a stream of their own
        self._recorders: dict[int, SampleRecorder] = {}

    def __call__(self, samples, sampler, tree) -> None:
        for sample in samples:
            self._recorders.setdefault(sample.pid, SampleRecorder(self.writer, pid=sample.pid))(sample)
        if self.follow and len(tree):
            self.writer.append(
                TREE,
                {
                    "t": tree.t[-1],
                    "ts": tree.ts[-1],
                    "rss": tree.rss[-1],
                    "classes": {c.value: v[-1] for c, v in tree.classes.items() if v[-1]},
                    "pids": [s.pid for s in samples],
                    **({"gpu_bytes": tree.gpu[-1]} if len(tree.gpu) == len(tree) else {}),
                    **charge_record(tree.footprint[-1], tree.shm, tree.cgroup, tree.dev_shm),
                },
            )

    def flush_last(self) -> None:
        for recorder in self._recorders.values():
            recorder.flush_last()
