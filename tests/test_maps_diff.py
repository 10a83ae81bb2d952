"""`leakhunt maps` and `leakhunt diff` on saved smaps, pmap -X output and recordings: they agree
with what watch measured on the same process, and reject damaged files in one line."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from conftest import SHARED_DATA, leakhunt_json, run_leakhunt

MiB = 2**20
H100 = SHARED_DATA / "smaps-h100-torch-pinned.txt"


def test_maps_of_a_saved_h100_smaps():
    doc = leakhunt_json("maps", H100)
    assert doc["regions"] == 555 and doc["gpu_process"]
    assert doc["classes"]["pinned"] == {**doc["classes"]["pinned"], "rss_bytes": 266 * MiB, "regions": 13}
    assert doc["groups"][0]["class"] == "pinned" and doc["groups"][0]["path"] == "/dev/zero (deleted)"
    assert doc["rss_bytes"] == sum(c["rss_bytes"] for c in doc["classes"].values())
    sizes = [g["rss_bytes"] for g in doc["groups"]]
    assert sizes == sorted(sizes, reverse=True)


def test_maps_of_pmap_x_output_matches_the_live_process(leakers, spawn, tmp_path):
    proc = spawn([leakers / "shm_leaker", "--rate", "8M", "--chunk", "1M"])
    time.sleep(1.5)
    proc.popen.send_signal(signal.SIGSTOP)  # freeze it so that both views see the same memory
    try:
        pmap = subprocess.run(
            ["pmap", "-X", str(proc.pid)], capture_output=True, text=True, check=True
        ).stdout
        (tmp_path / "pmap.txt").write_text(pmap)
        live = leakhunt_json("maps", "--pid", proc.pid, "--top", "0")
        saved = leakhunt_json("maps", tmp_path / "pmap.txt", "--top", "0")
    finally:
        proc.popen.send_signal(signal.SIGCONT)
    assert saved["regions"] == live["regions"]
    assert saved["rss_bytes"] == live["rss_bytes"]
    assert saved["classes"]["shm"]["rss_bytes"] == live["classes"]["shm"]["rss_bytes"] >= 8 * MiB
    assert saved["classes"]["lib"]["rss_bytes"] == live["classes"]["lib"]["rss_bytes"]


def test_diff_of_a_recording_agrees_with_watch(leakers, spawn, tmp_path):
    proc = spawn([leakers / "pool_leaker", "--rate", "4M", "--chunk", "1M"])
    watch = leakhunt_json("watch", "--pid", proc.pid, "--duration", "5s", "--record", tmp_path / "rec")
    doc = leakhunt_json("diff", f"{tmp_path / 'rec'}@first", f"{tmp_path / 'rec'}@last")
    assert doc["rss_growth_bytes"] == watch["rss_bytes_end"] - watch["rss_bytes_start"]
    assert doc["rss_growth_bytes"] >= 16 * MiB
    assert doc["groups"][0]["class"] == "anon" and doc["groups"][0]["rss_growth_bytes"] >= 16 * MiB
    assert doc["classes"]["anon"]["rss_growth_bytes"] == doc["groups"][0]["rss_growth_bytes"]
    last = leakhunt_json("maps", tmp_path / "rec")
    assert last["rss_bytes"] == watch["rss_bytes_end"]


def test_diff_names_new_regions_and_their_neighbours(tmp_path):
    before = H100.read_bytes()
    # The same process later: one more pinned buffer and an anonymous range grown by 64 MiB.
    extra = (
        b"7f0000000000-7f0002000000 rw-s 00000000 00:01 9999                       /dev/zero (deleted)\n"
        b"Size:              32768 kB\nRss:               32768 kB\n"
    )
    (tmp_path / "a").write_bytes(before)
    (tmp_path / "b").write_bytes(before + extra)
    doc = leakhunt_json("diff", tmp_path / "a", tmp_path / "b")
    assert doc["rss_growth_bytes"] == 32 * MiB
    assert doc["classes"]["pinned"]["rss_growth_bytes"] == 32 * MiB
    top = doc["groups"][0]
    assert (top["class"], top["new_regions"], top["rss_growth_bytes"]) == ("pinned", 1, 32 * MiB)


@pytest.mark.parametrize("content", [b"", b"garbage\n", None])
def test_bad_files_are_one_line_and_exit_2(tmp_path, content):
    path = tmp_path / "f"
    if content is None:
        data = H100.read_bytes()
        content = data[: len(data) * 2 // 3]  # cut mid-line
    path.write_bytes(content)
    for argv in (["maps", path], ["diff", path, H100]):
        cp = run_leakhunt(*argv)
        assert cp.returncode == 2
        assert len(cp.stderr.strip().splitlines()) == 1 and "Traceback" not in cp.stderr


def test_missing_file_and_missing_arguments():
    assert run_leakhunt("maps", "/nonexistent/smaps").returncode == 2
    cp = run_leakhunt("maps")
    assert cp.returncode == 2 and "--pid" in cp.stderr


def test_maps_reads_the_target_ahead_of_its_imports(leakers, spawn):
    """`maps --pid P` starts reading P's smaps before importing numpy and rich (leakhunt.prefetch);
    what it hands over is that process's smaps, once, and nothing is read for other commands."""
    from leakhunt import prefetch
    from leakhunt.proc.smaps import parse_smaps
    from leakhunt.proc.target import proc_read

    proc = spawn([leakers / "steady"])
    proc.popen.send_signal(signal.SIGSTOP)
    try:
        prefetch.start(["leakhunt", "maps", "--top", "5", f"--pid={proc.pid}"])
        ahead = prefetch.take(proc.pid, "smaps")
        now = proc_read(proc.pid, "smaps")
    finally:
        proc.popen.send_signal(signal.SIGCONT)
    assert ahead is not None
    raw, parsed = ahead
    assert parsed is not None  # parsed ahead too, by the C parser
    assert len(parse_smaps(raw, parsed=parsed)) == len(parse_smaps(raw)) == len(parse_smaps(now)) > 10
    assert prefetch.take(proc.pid, "smaps") is None  # handed over once
    for argv in (["leakhunt", "watch", "--pid", str(proc.pid)], ["leakhunt", "maps", "--pid", "x1"]):
        prefetch.start(argv)
        assert prefetch.take(proc.pid, "smaps") is None
