"""Shared terminal rendering: consoles, sparklines, and the styles every command uses."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.segment import Segment
from rich.text import Text

from leakhunt.text import printable
from leakhunt.units import format_bytes, format_rate

_BLOCKS = "▁▂▃▄▅▆▇█"


class SafeConsole(Console):
    """A console for text leakhunt does not control: no markup or emoji codes are read in what it
    prints (styles come from Text and Table objects only), and every control character in the
    text, an escape sequence a target put in its command line say, reaches the terminal as a
    visible escape. The sequences rich writes for its own styles and cursor moves are untouched."""

    def __init__(self, **kwargs) -> None:
        super().__init__(markup=False, emoji=False, highlight=False, **kwargs)

    def _render_buffer(self, buffer) -> str:
        return super()._render_buffer(
            seg if seg.control else Segment(printable(seg.text), seg.style) for seg in buffer
        )


#: Human output goes to stdout; with --json it goes to stderr so stdout stays one JSON document.
out = SafeConsole()
err = SafeConsole(stderr=True)


def console_for(as_json: bool) -> Console:
    return err if as_json else out


def emit_json(document: Any) -> None:
    """The one JSON document a command prints with --json."""
    sys.stdout.write(json.dumps(document, indent=2, default=_json_default, allow_nan=False) + "\n")
    sys.stdout.flush()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_json"):
        return obj.to_json()
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "value"):
        return obj.value
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def clean_json(value: Any) -> Any:
    """NaN and infinity are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """The last ``width`` values as block characters, scaled between their min and max."""
    vals = [float(v) for v in values[-width:]]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    if hi - lo <= 0:
        return _BLOCKS[0] * len(vals)
    return "".join(_BLOCKS[min(7, int((v - lo) / (hi - lo) * 8))] for v in vals)


def growth_text(n: float) -> Text:
    style = "red" if n > 0 else ("green" if n < 0 else "dim")
    return Text(format_bytes(n, signed=True), style=style)


def rate_text(slope: float, lo: float | None = None, hi: float | None = None, leak: bool = False) -> Text:
    text = Text(format_rate(slope), style="bold red" if leak else "")
    if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
        text.append(f" [{format_rate(lo).split()[0]} .. {format_rate(hi).split()[0]}]", style="dim")
    return text


def verdict_badge(leak: bool, plateau: bool = False) -> Text:
    if leak:
        return Text(" LEAK ", style="bold white on red")
    if plateau:
        return Text(" plateau ", style="black on yellow")
    return Text(" no leak ", style="black on green")
