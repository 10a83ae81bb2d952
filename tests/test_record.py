"""Recordings: append-only, crash-tolerant, strict about real damage."""

from __future__ import annotations

import pytest

from leakhunt.errors import CorruptRecording
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


def test_damage_in_the_middle_is_an_error(tmp_path):
    w = SessionWriter(tmp_path / "s", "test")
    w.close()
    (tmp_path / "s" / "events.jsonl").write_bytes(b'{"n": 1}\nGARBAGE\n{"n": 3}\n')
    with pytest.raises(CorruptRecording, match="line 2"):
        list(Recording.open(tmp_path / "s").records("events"))


def test_not_a_recording(tmp_path):
    with pytest.raises(CorruptRecording, match="not a leakhunt recording"):
        Recording.open(tmp_path)
    (tmp_path / "session.json").write_text("{nope")
    with pytest.raises(CorruptRecording, match="unreadable"):
        Recording.open(tmp_path)


def test_a_second_command_joins_the_session(tmp_path):
    SessionWriter(tmp_path / "s", "watch", {"pid": 1}).close()
    SessionWriter(tmp_path / "s", "trace-mmap", {"pid": 1}).close()
    rec = Recording.open(tmp_path / "s")
    assert rec.session["command"] == "watch"
    assert rec.notes()[0]["note"] == "joined" and rec.notes()[0]["session"]["command"] == "trace-mmap"
