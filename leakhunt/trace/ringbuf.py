"""Reading a BPF ring buffer straight from its memory mapping, from a thread of its own.

libbpf's consumer calls back into Python once per record through ctypes, which costs more than
the record's whole processing; the ring's layout is a stable kernel ABI (kernel/bpf/ringbuf.c):
a read-write consumer page, then a read-only producer page and the data pages, mapped twice in
a row so a record that wraps is still contiguous. A drain thread keeps the ring empty while the
caller converts what was drained at its own pace, so bursts land in memory, not in the counter
of records the kernel could not reserve.

A ring whose records all have one size (``record_size``: the probe's CALL records) is drained in
bulk: the records between the consumer and producer positions lie at a fixed stride, so one
numpy view over them finds the committed ones and one copy takes them, however many there are.
Other rings are walked record by record. Either way, once ``max_backlog`` records wait to be
taken the drain stops: the ring fills and the kernel counts what it cannot reserve, so memory
stays bounded and losses stay exact.
"""

from __future__ import annotations

import mmap
import struct
import threading
from collections import deque

import numpy as np

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HEADER = 8
_U32 = struct.Struct("<I")


class RingBufferReader:
    def __init__(
        self, map_fd: int, data_size: int, record_size: int | None = None, max_backlog: int = 1_000_000
    ) -> None:
        page = mmap.PAGESIZE
        self.size = data_size
        self.mask = data_size - 1
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data_off = page
        # The positions are read and written as whole 64-bit words: struct packs and unpacks byte
        # by byte, and the kernel, reading a half-written consumer position, can see one past its
        # producer and refuse every reservation (records lost, counted, but lost).
        self._cons = np.frombuffer(self._consumer, np.uint64, 1)
        self._prod = np.frombuffer(self._producer, np.uint64, 1)
        self._stride = (record_size + _HEADER + 7) & ~7 if record_size else 0
        self._record_size = record_size or 0
        self._records: deque = deque()  # bytes, or arrays of fixed records
        self._queued = 0
        self.max_backlog = max_backlog
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def backlog(self) -> int:
        """Records drained and not taken yet."""
        return self._queued

    def drain(self) -> int:
        """Move committed records into the queue (up to max_backlog waiting); returns how many."""
        with self._lock:
            room = self.max_backlog - self._queued
            if room <= 0:
                return 0
            n = self._drain_fixed(room) if self._stride else self._drain_records(room)
            self._queued += n
            return n

    def _drain_fixed(self, room: int) -> int:
        cons, prod = int(self._cons[0]), int(self._prod[0])
        n = min((prod - cons) // self._stride, room)
        if n <= 0:
            return 0
        at = self._data_off + (cons & self.mask)
        raw = np.frombuffer(self._producer, np.uint8, n * self._stride, at).reshape(n, self._stride)
        header = raw[:, :4].copy().view("<u4").ravel()
        busy = np.flatnonzero(header & _BUSY)
        if len(busy):
            n = int(busy[0])  # reserved, not committed yet: the next drain takes it and what follows
            raw, header = raw[:n], header[:n]
        if n == 0:
            return 0
        kept = raw[(header & _DISCARD) == 0, _HEADER : _HEADER + self._record_size].copy()
        self._cons[0] = cons + n * self._stride
        if len(kept):
            self._records.append(kept)
        return len(kept)

    def _drain_records(self, room: int) -> int:
        cons, prod = int(self._cons[0]), int(self._prod[0])
        data, base, mask, out = self._producer, self._data_off, self.mask, self._records
        n = 0
        while cons < prod and n < room:
            at = base + (cons & mask)
            length = _U32.unpack_from(data, at)[0]
            if length & _BUSY:
                break  # reserved, not committed yet: the next drain takes it
            size = length & ~(_BUSY | _DISCARD)
            if not length & _DISCARD:
                out.append(data[at + _HEADER : at + _HEADER + size])
                n += 1
            cons += (size + _HEADER + 7) & ~7
        self._cons[0] = cons
        return n

    def take(self, limit: int | None = None) -> list:
        """The records drained so far, oldest first: bytes each, or for a fixed-size ring arrays
        of records (uint8, one row a record), at most ``limit`` records in all."""
        self.drain()
        out, taken = [], 0
        with self._lock:
            records = self._records
            while records and (limit is None or taken < limit):
                item = records.popleft()
                if self._stride:
                    if limit is not None and taken + len(item) > limit:
                        records.appendleft(item[limit - taken :])
                        item = item[: limit - taken]
                    taken += len(item)
                else:
                    taken += 1
                out.append(item)
            self._queued -= taken
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
        del self._cons, self._prod  # the views pin the mappings
        self._consumer.close()
        self._producer.close()
