"""The smaps parser and the region classes, on real smaps: our own process, a process with tens
of thousands of mappings, and a real H100 + torch process (tests/data, from ../shared/data)."""

from __future__ import annotations

import gzip
import mmap
import os

import numpy as np
import pytest
from conftest import SHARED_DATA

from leakhunt.errors import BadInput
from leakhunt.proc.classes import CLASS_CODE, RegionClass, classify
from leakhunt.proc.smaps import _parse_fast, _parse_generic, _smaps, load_smaps, parse_smaps, read_smaps
from leakhunt.proc.target import proc_read

H100 = SHARED_DATA / "smaps-h100-torch-pinned.txt"
MiB = 2**20


def assert_same(a, b):
    assert a.field_names == b.field_names
    assert np.array_equal(a.values, b.values)
    assert np.array_equal(a.start, b.start) and np.array_equal(a.end, b.end)
    assert np.array_equal(a.offset, b.offset) and np.array_equal(a.inode, b.inode)
    assert a.path == b.path and a.perms == b.perms and a.dev == b.dev
    assert list(a.vmflags) == list(b.vmflags)
    assert np.array_equal(a.classes, b.classes)
    # the distinct-path index that classification and grouping use agrees with the paths
    assert a.distinct_paths == b.distinct_paths == list(dict.fromkeys(a.path))
    assert np.array_equal(a.path_ids, b.path_ids)
    assert [a.distinct_paths[i] for i in a.path_ids.tolist()] == a.path


def test_the_c_parser_is_built():
    assert _smaps is not None, "leakhunt/proc/_smaps.c was not compiled (pip install needs a C compiler)"


def test_fast_and_line_parsers_agree_on_a_live_process():
    data = proc_read(os.getpid(), "smaps")
    fast = _parse_fast(data)
    assert fast is not None, "the kernel's smaps should take the fast path"
    assert_same(fast, _parse_generic(data, "self"))


def test_fast_and_line_parsers_agree_on_the_h100_process():
    data = H100.read_bytes()
    assert_same(_parse_fast(data), _parse_generic(data, "h100"))


def test_fast_and_line_parsers_agree_on_many_mappings(leakers, spawn):
    proc = spawn([leakers / "manymaps", "20000"])
    data = proc_read(proc.pid, "smaps")
    fast = _parse_fast(data)
    assert fast is not None and len(fast) > 20000
    assert_same(fast, _parse_generic(data, "manymaps"))
    # every page of manymaps is touched: its mappings each hold one resident page
    anon = fast.classes == CLASS_CODE[RegionClass.ANON]
    assert (fast.rss[anon] >= 4096).sum() >= 20000


def test_values_are_bytes_and_rss_matches_status():
    buf = mmap.mmap(-1, 32 * MiB)
    buf.write(b"x" * (32 * MiB))
    snap = read_smaps(os.getpid())
    # Python's anonymous mmap is MAP_SHARED: the kernel shows it as shmem, "/dev/zero (deleted)"
    region = next(r for r in snap if r.size == 32 * MiB and r.path == "/dev/zero (deleted)")
    assert region.rss == 32 * MiB and region.anonymous == 0
    assert region.klass is RegionClass.SHM
    status_rss = (
        int(
            next(line.split()[1] for line in open(f"/proc/{os.getpid()}/status") if line.startswith("VmRSS:"))
        )
        * 1024
    )
    assert abs(snap.total_rss - status_rss) < 0.05 * status_rss
    buf.close()


def test_private_anonymous_memory_is_anon():
    buf = mmap.mmap(-1, 8 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.write(b"y" * (8 * MiB))
    snap = read_smaps(os.getpid())
    region = next(r for r in snap if r.start <= _address(buf) < r.end)
    assert region.klass is RegionClass.ANON and region.anonymous >= 8 * MiB
    buf.close()


def _address(buf: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def test_h100_torch_process_pinned_memory_is_pinned_not_anonymous():
    snap = load_smaps(H100)
    assert len(snap) == 555 and snap.gpu_process
    pinned = snap.classes == CLASS_CODE[RegionClass.PINNED]
    assert pinned.sum() == 13
    assert snap.rss[pinned].sum() == 266 * MiB
    assert snap.column("Anonymous")[pinned].sum() == 0
    totals = snap.class_totals()
    assert totals[RegionClass.PINNED] == 266 * MiB
    assert totals[RegionClass.SHM] == 0  # in a GPU process shared /dev/zero is pinned, not shm


def test_h100_driver_mappings_are_gpu():
    snap = load_smaps(H100)
    gpu = [r for r in snap if r.klass is RegionClass.GPU]
    assert sum(r.path == "/dev/nvidiactl" for r in gpu) == 27
    assert {r.path for r in gpu} == {"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0"}
    assert 60 * MiB < sum(r.rss for r in gpu) < 80 * MiB


def test_the_same_shared_zero_mapping_without_a_gpu_is_shm():
    text = H100.read_bytes()
    # Drop every GPU driver mapping: the process is no longer a GPU process.
    entries = text.split(b"\n")
    kept, skip = [], False
    for line in entries:
        if line[:1] and not line[:1].isupper():
            skip = b"/dev/nvidia" in line
        if not skip:
            kept.append(line)
    snap = parse_smaps(b"\n".join(kept))
    assert not snap.gpu_process
    assert snap.class_totals()[RegionClass.SHM] == 266 * MiB
    assert snap.class_totals()[RegionClass.PINNED] == 0


@pytest.mark.parametrize(
    "path, perms, gpu, expected",
    [
        ("", "rw-p", False, RegionClass.ANON),
        ("[heap]", "rw-p", False, RegionClass.HEAP),
        ("[stack]", "rw-p", False, RegionClass.STACK),
        ("[vdso]", "r-xp", False, RegionClass.SPECIAL),
        ("[anon:ucx-pool]", "rw-p", False, RegionClass.ANON),
        ("/dev/shm/sgl_shm_42", "rw-s", False, RegionClass.SHM),
        ("memfd:pytorch (deleted)", "rw-s", False, RegionClass.SHM),
        ("/memfd:obj (deleted)", "rw-s", False, RegionClass.SHM),
        ("/SYSV00000000 (deleted)", "rw-s", False, RegionClass.SHM),
        ("/dev/zero (deleted)", "rw-s", True, RegionClass.PINNED),
        ("/dev/zero (deleted)", "rw-s", False, RegionClass.SHM),
        ("/dev/zero (deleted)", "rw-p", True, RegionClass.ANON),
        ("/dev/nvidiactl", "rw-s", True, RegionClass.GPU),
        ("/dev/dri/renderD128", "rw-s", True, RegionClass.GPU),
        ("/dev/kfd", "rw-s", True, RegionClass.GPU),
        ("/usr/lib/x86_64-linux-gnu/libucm.so.0.0.0", "r-xp", False, RegionClass.LIB),
        ("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "r-xp", False, RegionClass.LIB),
        (
            "/opt/venv/lib/python3.12/site-packages/torch/_C.cpython-312-x86_64-linux-gnu.so",
            "r--p",
            False,
            RegionClass.LIB,
        ),
        ("/tmp/libleak.so (deleted)", "r-xp", False, RegionClass.LIB),
        ("/usr/bin/python3.11", "r-xp", False, RegionClass.FILE),
        ("/var/cache/model.bin", "r--s", False, RegionClass.FILE),
    ],
)
def test_classify(path, perms, gpu, expected):
    assert classify(path, perms, gpu) is expected


def test_gzip_saved_smaps_loads(tmp_path):
    path = tmp_path / "smaps.gz"
    path.write_bytes(gzip.compress(H100.read_bytes()))
    assert len(load_smaps(path)) == 555


def test_truncated_smaps_is_rejected(tmp_path):
    path = tmp_path / "cut"
    data = H100.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match="truncated"):
        load_smaps(path)


def test_a_file_that_is_not_smaps_is_rejected(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("Hello: this is not smaps\nnor this\n")
    with pytest.raises(BadInput):
        load_smaps(path)
    path.write_text("zzzz-qqqq rw-p what\n")
    with pytest.raises(BadInput):
        load_smaps(path)


def test_entries_with_differing_fields_parse_through_the_line_parser():
    text = (
        b"00400000-00401000 r-xp 00000000 08:01 42   /bin/x\nSize:  4 kB\nRss:  4 kB\n"
        b"00600000-00700000 rw-p 00000000 00:00 0 \nSize:  1024 kB\nRss:  512 kB\nSwap: 8 kB\n"
        b"VmFlags: rd wr mr mw me ac\n"
    )
    snap = parse_smaps(text)
    assert len(snap) == 2
    assert snap[1].rss == 512 * 1024 and snap[1].swap == 8 * 1024 and snap[0].swap == 0
    assert snap[1].vmflags == "rd wr mr mw me ac"
    assert snap[1].klass is RegionClass.ANON and snap[0].klass is RegionClass.FILE
