"""The live display of the commands that refresh (watch, top): rich's Live on terminals, rebuilt at
most once per REFRESH_S; nothing at all when the output is not a terminal."""

from __future__ import annotations

import time

from rich.live import Live

REFRESH_S = 1.0


class LiveView:
    """A rich Live display on terminals, rebuilt at most once per REFRESH_S; nothing otherwise."""

    def __init__(self, console) -> None:
        self.enabled = console.is_terminal
        self.live = Live(console=console, auto_refresh=False, transient=False, redirect_stdout=False)
        self._last = 0.0
        self.final = None

    def due(self, first: bool) -> bool:
        now = time.monotonic()
        if not self.enabled or (now - self._last < REFRESH_S and not first):
            return False
        self._last = now
        return True

    def show(self, renderable) -> None:
        self.live.update(renderable, refresh=True)

    def __enter__(self) -> LiveView:
        if self.enabled:
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.live.stop()
