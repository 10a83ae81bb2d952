"""A BCC program that reports through a perf buffer read in a thread of its own: the shape of the
tracers that add evidence beside the mmap tracer (who creates shared objects, page faults), whose
events are rare enough for a callback each."""

from __future__ import annotations

import threading
import time

from leakhunt import resources
from leakhunt.errors import BackendUnavailable


class PerfProgram:
    """Subclasses name the probe, give its -D flags and handle each event; ``setup`` runs once the
    program is loaded, ``tick`` after every poll, ``finish`` just before it is unloaded."""

    probe: str = ""
    buffer: bytes = b"events"
    pages: int = 64
    poll_ms: int = 100

    def __init__(self) -> None:
        self.bpf = None
        self.lost = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def cflags(self) -> list[str]:
        return []

    def setup(self) -> None:
        pass

    def on_event(self, data) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def start(self) -> None:
        from leakhunt.trace.bcc import BccBackend  # noqa: PLC0415 - BCC's checks, loaded only here

        reason = BccBackend.unavailable_reason()
        if reason:
            raise BackendUnavailable("bcc", reason)
        from bcc import BPF  # noqa: PLC0415 - loads libbcc: only when a tracer is used

        try:
            self.bpf = BPF(text=resources.probe(self.probe).read_text().encode(), cflags=self.cflags())
        except Exception as e:  # BCC raises bare Exception for compile and load errors
            raise BackendUnavailable("bcc", f"cannot load {self.probe}: {str(e).splitlines()[0]}") from None
        self.setup()
        self.bpf[self.buffer].open_perf_buffer(
            lambda _cpu, data, _size: self.on_event(data), page_cnt=self.pages, lost_cb=self._on_lost
        )
        self._thread = threading.Thread(target=self._poll, name=self.probe, daemon=True)
        self._thread.start()

    def _on_lost(self, count: int) -> None:
        self.lost += count

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.bpf.perf_buffer_poll(timeout=self.poll_ms)
                self.tick()
            except Exception:  # noqa: BLE001 - evidence, never a reason to fail
                time.sleep(self.poll_ms / 1000)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self.bpf is not None:
            self.finish()
            self.bpf.cleanup()
            self.bpf = None
