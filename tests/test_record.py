"""Recordings: append-only, crash-tolerant, strict about real damage."""

from __future__ import annotations

import subprocess

import pytest

from leakhunt.errors import BadInput, CorruptRecording
from leakhunt.record import Recording, SessionWriter


def test_round_trip(tmp_path):
    w = SessionWriter(tmp_path / "s", "test", {"pid": 1})
    w.append("samples", {"seq": 0, "t": 0.0, "ts": 1.0, "rss": 10, "classes": {"anon": 10}, "groups": []})
    w.append_many("events", [{"kind": "mmap", "n": i} for i in range(3)])
    w.finish({"ok": True})
    rec = Recording.open(tmp_path / "s")
    assert rec.complete and rec.summary["ok"]
    assert [e["n"] for e in rec.records("events")] == [0, 1, 2]
    assert rec.samples_frame()["class_anon"].tolist() == [10]
    assert rec.streams() == ["events", "samples"]


def test_truncated_last_line_is_dropped_with_a_note(tmp_path):
    w = SessionWriter(tmp_path / "s", "test")
    w.append("events", {"n": 1})
    w.close()
    with open(tmp_path / "s" / "events.jsonl", "ab") as f:
        f.write(b'{"n": 2, "cut sh')
    rec = Recording.open(tmp_path / "s")
    assert [e["n"] for e in rec.records("events")] == [1]
    assert rec.problems and "truncated" in rec.problems[0]
    assert not rec.complete


def test_damage_in_the_middle_is_skipped_and_said(tmp_path):
    """One bad line (garbage, a JSON value that is not a record, a sample without its numbers)
    costs that line, not the recording."""
    w = SessionWriter(tmp_path / "s", "test")
    w.close()
    (tmp_path / "s" / "events.jsonl").write_bytes(b'{"n": 1}\nGARBAGE\n[]\n{"n": 3}\n')
    (tmp_path / "s" / "samples.jsonl").write_bytes(b'{"seq": 1}\n{"seq": 2, "t": 1.0, "rss": 4096}\n')
    rec = Recording.open(tmp_path / "s")
    assert [r["n"] for r in rec.records("events")] == [1, 3]
    assert [s["seq"] for s in rec.samples()] == [2]
    assert any("line 2" in p for p in rec.problems) and any("line 3" in p for p in rec.problems)
    assert any("without seq/t/rss" in p for p in rec.problems)


def test_not_a_recording(tmp_path):
    with pytest.raises(CorruptRecording, match="not a leakhunt recording"):
        Recording.open(tmp_path)
    (tmp_path / "session.json").write_text("{nope")
    with pytest.raises(CorruptRecording, match="unreadable"):
        Recording.open(tmp_path)


def test_a_second_command_joins_the_session_only_when_asked(tmp_path):
    SessionWriter(tmp_path / "s", "watch", {"pid": 1}).close()
    with pytest.raises(BadInput, match="holds a recording already"):
        SessionWriter(tmp_path / "s", "trace-mmap", {"pid": 1})
    SessionWriter(tmp_path / "s", "trace-mmap", {"pid": 1}, append=True).close()
    rec = Recording.open(tmp_path / "s")
    assert rec.session["command"] == "watch"
    assert rec.notes()[0]["note"] == "joined" and rec.notes()[0]["session"]["command"] == "trace-mmap"
    assert rec.notes()[0]["session"]["number"] == 2


def test_one_writer_at_a_time(tmp_path):
    first = SessionWriter(tmp_path / "s", "watch", {"pid": 1})
    with pytest.raises(BadInput, match="another leakhunt is recording"):
        SessionWriter(tmp_path / "s", "watch", {"pid": 1}, append=True)
    first.close()
    SessionWriter(tmp_path / "s", "watch", {"pid": 1}, append=True).close()  # free again


def test_an_appended_session_overwrites_nothing_and_mixes_nothing(tmp_path):
    for run in (1, 2):
        w = SessionWriter(tmp_path / "s", "watch", {"pid": 1}, append=run > 1)
        rel = w.snapshot(0, f"run {run}\n".encode())
        w.append("samples", {"seq": 0, "t": 0.0, "rss": run, "snapshot": rel})
        w.close()
    rec = Recording.open(tmp_path / "s")
    assert [s["rss"] for s in rec.samples()] == [1]  # the first session's run alone
    texts = sorted(
        rec.snapshot_text(p.relative_to(rec.dir).as_posix()) for p in (rec.dir / "snapshots").iterdir()
    )
    assert texts == [b"run 1\n", b"run 2\n"]


@pytest.fixture
def tiny_fs(tmp_path):
    """A 16 KiB tmpfs: a disk that fills during a run (mounting needs root)."""
    from conftest import have_root, need

    need(have_root(), "mounting a small tmpfs needs root")
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_ends_the_run_in_one_line_and_keeps_what_was_written(tiny_fs, leakers, spawn):
    """ENOSPC while recording: exit 2, one line naming the file, no traceback, the target untouched,
    and the recording as far as it got still renders."""
    from conftest import run_leakhunt

    target = spawn([leakers / "pool_leaker", "--rate", "1M", "--chunk", "64K"])
    rec = tiny_fs / "rec"
    cp = run_leakhunt(
        "watch", "--pid", target.pid, "--interval", "0.2s", "--duration", "60s", "--record", rec
    )
    err = cp.stderr.strip().splitlines()
    assert cp.returncode == 2 and len(err) == 1, cp.stderr
    assert "No space left on device" in err[0] and str(rec) in err[0] and "Traceback" not in cp.stderr
    assert target.alive()
    assert not list(rec.rglob(".*.tmp")), "a half-written snapshot was left behind"
    report = run_leakhunt("report", rec, "--markdown", tiny_fs.parent / "r.md")
    assert report.returncode == 0, report.stderr
