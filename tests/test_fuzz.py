"""Property tests over every reader of outside input: the units parsers (durations, sizes,
rates), smaps (the C parser and the line parser), pmap -X, gzip and recordings. Arbitrary bytes
never crash one: each answers with a value or a one-line BadInput (CorruptRecording) saying
what is wrong. Valid input round-trips. A fixed seed and budget: the same cases every run."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leakhunt.errors import BadInput, CorruptRecording
from leakhunt.files import gunzip
from leakhunt.proc import smaps as smaps_mod
from leakhunt.proc.pmapx import parse_pmap_x
from leakhunt.proc.smaps import parse_smaps
from leakhunt.record import Recording, SessionWriter
from leakhunt.units import format_bytes, parse_duration, parse_rate, parse_size

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

SMAPS_ENTRY = (
    "{lo:012x}-{hi:012x} {perms} {off:08x} {dev} {inode} {path}\n"
    "Size:           {size:8d} kB\n"
    "Rss:            {rss:8d} kB\n"
    "Pss:            {rss:8d} kB\n"
    "Private_Dirty:  {rss:8d} kB\n"
    "Anonymous:      {anon:8d} kB\n"
    "VmFlags: rd wr mr mw me ac\n"
)

entry = st.fixed_dictionaries(
    {
        "pages": st.integers(1, 4096),
        "perms": st.sampled_from(["rw-p", "r-xp", "rw-s", "---p", "r--p"]),
        "dev": st.sampled_from(["00:00", "fd:01", "00:05"]),
        "inode": st.integers(0, 10**7),
        "path": st.sampled_from(
            ["", "[heap]", "[stack]", "/usr/lib/libc.so.6", "/dev/shm/x", "memfd:y (deleted)"]
        ),
        "resident": st.floats(0, 1),
    }
)


def smaps_text(entries: list[dict]) -> tuple[bytes, list[int]]:
    lo, text, rss = 0x7F0000000000, [], []
    for e in entries:
        size = e["pages"] * 4
        r = int(size * e["resident"]) // 4 * 4
        text.append(
            SMAPS_ENTRY.format(
                lo=lo,
                hi=lo + size * 1024,
                perms=e["perms"],
                off=0,
                dev=e["dev"],
                inode=e["inode"],
                path=e["path"],
                size=size,
                rss=r,
                anon=r if not e["path"] else 0,
            )
        )
        rss.append(r * 1024)
        lo += size * 1024 + 4096
    return "".join(text).encode(), rss


@FUZZ
@given(st.text(max_size=40))
def test_unit_parsers_answer_a_value_or_a_valueerror(text):
    for parse in (parse_duration, parse_size, parse_rate):
        try:
            value = parse(text)
        except ValueError:
            continue
        assert value >= 0 and value == value and value != float("inf")


@FUZZ
@given(st.integers(0, 2**61), st.sampled_from(["", "B", "K", "KiB", "MiB", "GiB"]))
def test_sizes_round_trip(n, unit):
    scale = {"": 1, "B": 1, "K": 1024, "KiB": 1024, "MiB": 2**20, "GiB": 2**30}[unit]
    if n * scale < 2**62:
        assert parse_size(f"{n}{unit}") == n * scale
    assert format_bytes(n)  # any size prints


@FUZZ
@given(st.binary(max_size=2000))
def test_smaps_readers_never_crash_on_bytes(data):
    for parse in (parse_smaps, lambda d, source="x": smaps_mod._parse_generic(d, source)):
        try:
            parse(data, source="fuzz")
        except BadInput as e:
            assert "\n" not in str(e)


@FUZZ
@given(st.lists(entry, min_size=1, max_size=30))
def test_valid_smaps_round_trip_through_both_parsers(entries):
    data, rss = smaps_text(entries)
    fast = parse_smaps(data)
    slow = smaps_mod._parse_generic(data, "fuzz")
    assert len(fast) == len(slow) == len(entries)
    assert list(fast.rss) == list(slow.rss) == rss
    assert list(fast.path) == list(slow.path) == [e["path"] for e in entries]


@FUZZ
@given(st.lists(entry, min_size=1, max_size=10), st.integers(0, 5000), st.binary(min_size=1, max_size=8))
def test_damaged_smaps_is_refused_or_read_never_crashes(entries, at, junk):
    data, _ = smaps_text(entries)
    damaged = data[:at] + junk + data[at:]
    try:
        snap = parse_smaps(damaged, source="fuzz")
    except BadInput:
        return
    assert np.all(np.asarray(snap.rss) >= 0)  # never a negative size from an overflow


@FUZZ
@given(st.binary(max_size=2000))
def test_pmap_reader_never_crashes_on_bytes(data):
    header = b"1234:   prog\n         Address Perm   Offset Device   Inode   Size    Rss Mapping\n"
    for blob in (data, header + data):
        try:
            parse_pmap_x(blob, "fuzz")
        except BadInput as e:
            assert "\n" not in str(e)


@FUZZ
@given(st.binary(max_size=4000))
def test_gzip_reader_refuses_what_is_not_gzip_and_reads_what_is(data):
    assert gunzip(gzip.compress(data)) == data
    try:
        gunzip(b"\x1f\x8b" + data)
    except BadInput:
        pass


def test_a_gzip_bomb_is_refused_within_its_limit():
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in about 64 KiB
    with pytest.raises(BadInput, match="decompresses to more than"):
        gunzip(bomb, limit=16 << 20)


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=80), st.builds(json.dumps, st.dictionaries(st.text(max_size=5), st.integers()))
        ),
        max_size=20,
    )
)
def test_recordings_with_any_lines_are_read(tmp_path_factory, lines):
    d = tmp_path_factory.mktemp("rec")
    SessionWriter(d, "watch", {"pid": 1}).close()
    blob = b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines)
    (d / "samples.jsonl").write_bytes(blob)
    (d / "events.jsonl").write_bytes(blob)
    try:
        rec = Recording.open(d)
    except CorruptRecording:
        pytest.fail("a damaged stream must not make the whole recording unreadable")
    for r in rec.samples():
        assert isinstance(r, dict) and {"seq", "t", "rss"} <= set(r)
    assert all(isinstance(r, dict) for r in rec.records("events"))
