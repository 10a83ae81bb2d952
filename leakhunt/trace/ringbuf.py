"""Reading a BPF ring buffer straight from its memory mapping, from a thread of its own.

libbpf's consumer calls back into Python once per record through ctypes, which costs more than
the record's whole processing; the ring's layout is a stable kernel ABI (kernel/bpf/ringbuf.c):
a read-write consumer page, then a read-only producer page and the data pages, mapped twice in
a row so a record that wraps is still contiguous. A drain thread keeps the ring empty while the
caller converts what was drained at its own pace, so bursts land in memory, not in the counter
of records the kernel could not reserve.
"""

from __future__ import annotations

import mmap
import struct
import threading
from collections import deque

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HEADER = 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class RingBufferReader:
    def __init__(self, map_fd: int, data_size: int) -> None:
        page = mmap.PAGESIZE
        self.size = data_size
        self.mask = data_size - 1
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data_off = page
        self._records: deque[bytes] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def drain(self) -> int:
        """Move every committed record into the queue; returns how many."""
        with self._lock:
            cons = _U64.unpack_from(self._consumer, 0)[0]
            prod = _U64.unpack_from(self._producer, 0)[0]
            data, base, mask, out = self._producer, self._data_off, self.mask, self._records
            n = 0
            while cons < prod:
                at = base + (cons & mask)
                length = _U32.unpack_from(data, at)[0]
                if length & _BUSY:
                    break  # reserved, not committed yet: the next drain takes it
                size = length & ~(_BUSY | _DISCARD)
                if not length & _DISCARD:
                    out.append(data[at + _HEADER : at + _HEADER + size])
                    n += 1
                cons += (size + _HEADER + 7) & ~7
            _U64.pack_into(self._consumer, 0, cons)
            return n

    def take(self) -> list[bytes]:
        """The records drained so far, oldest first."""
        self.drain()
        out = []
        records = self._records
        while records:
            out.append(records.popleft())
        return out

    def start(self, every_s: float = 0.02) -> None:
        def loop() -> None:
            while not self._stop.wait(every_s):
                self.drain()

        self._thread = threading.Thread(target=loop, name="leakhunt-ringbuf", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the drain thread (take() still works)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        self._consumer.close()
        self._producer.close()
