"""MI frames into leakhunt Stacks: module from the target's maps, symbol from gdb's unwinder,
offset from gdb's ``<symbol+offset>`` rendering of the address, Python frames spliced in.

``-stack-list-frames`` names each frame's function (demangled) but not where the function
starts; gdb prints ``(void *) ADDR`` as ``0x... <symbol+offset>``, which costs one MI command
per distinct address, asked once and cached, and answered while the target already runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from leakhunt.gdb.memory import AddressSpace
from leakhunt.trace.events import Frame, Stack

#: Functions at which an unwind is complete (gdb stops at main; threads end in clone/start_thread).
OUTERMOST = frozenset(
    {
        "main",
        "_start",
        "__libc_start_main",
        "__libc_start_call_main",
        "start_thread",
        "clone",
        "clone3",
        "__clone",
        "__clone3",
        "__GI___clone3",
        "__GI___clone",
    }
)

#: C frames of CPython's interpreter loop: the Python frames they run are spliced in after them.
PYTHON_EVAL_FRAMES = frozenset({"_PyEval_EvalFrameDefault", "PyEval_EvalFrameEx"})

_SYMBOL = re.compile(r"<(.+?)(?:\+(\d+))?>\s*$")


@dataclass(frozen=True, slots=True)
class PythonFrame:
    """One frame of Python code, as the gdb-side helper read it from the interpreter."""

    function: str
    filename: str
    line: int
    eval_level: int  # the C frame (_PyEval_EvalFrameDefault) that runs it

    def to_frame(self) -> Frame:
        # address 0 marks an interpreted frame: module is the source file, offset the line.
        return Frame(0, self.filename, self.function, self.line)


def lookup_address(level: int, address: int) -> int:
    """The address to symbolize: a caller frame's address is a return address, which may already
    be past the end of its function (a call to a noreturn function), so look up the call itself."""
    return address - 1 if level > 0 else address


def parse_symbol(value: str) -> tuple[str | None, int | None]:
    """``0x7f... <lkpool_grow+23>`` -> ("lkpool_grow", 23); no symbol -> (None, None)."""
    m = _SYMBOL.search(value)
    if not m:
        return None, None
    return m.group(1), int(m.group(2) or 0)


class Symbolizer:
    """Offsets from symbol starts, learned from gdb once per address."""

    def __init__(self, space: AddressSpace) -> None:
        self.space = space
        self._offsets: dict[int, int | None] = {}  # lookup address -> offset (None: no symbol)

    def unknown(self, frames: list[dict]) -> list[int]:
        """Lookup addresses of these MI frames whose offset is not known yet (distinct, in order)."""
        keys = (lookup_address(int(f["level"]), int(f["addr"], 16)) for f in frames)
        return list(dict.fromkeys(k for k in keys if k not in self._offsets))

    def learn(self, key: int, value: str) -> None:
        _, offset = parse_symbol(value)
        self._offsets[key] = offset

    def frame_at(self, address: int, value: str) -> Frame:
        """A return address as gdb printed it (``0x... <symbol+offset>``) as a Frame."""
        symbol, offset = parse_symbol(value)
        return Frame(
            address,
            self.space.module_of(address),
            symbol,
            offset if offset is not None else _module_offset(self.space, address),
        )

    def stack(self, frames: list[dict], depth_limit: int, python: list[PythonFrame] = ()) -> Stack:
        out: list[Frame] = []
        by_level: dict[int, list[PythonFrame]] = {}
        for p in python:
            by_level.setdefault(p.eval_level, []).append(p)
        for f in frames:
            level = int(f["level"])
            address = int(f["addr"], 16)
            func = f.get("func")
            if func in (None, "??"):
                func = None
            offset = self._offsets.get(lookup_address(level, address))
            module = self.space.module_of(address)
            if offset is None:
                offset = 0 if func else _module_offset(self.space, address)
            elif level > 0:
                offset += 1  # we looked up address - 1
            out.append(Frame(address, module, func, offset))
            out.extend(p.to_frame() for p in by_level.get(level, ()))
        last = frames[-1].get("func") if frames else None
        complete = bool(frames) and len(frames) < depth_limit and last in OUTERMOST
        return Stack(tuple(out), partial=not complete, source="gdb")


def _module_offset(space: AddressSpace, address: int) -> int:
    """Without a symbol, the offset from the object's load base (what Frame documents)."""
    mapping = space.find(address, refresh=False)
    if mapping is None or not mapping.is_file:
        return 0
    return address - mapping.start + mapping.offset


def caller_of(stack: Stack) -> Frame | None:
    """The first frame past the libc wrapper (frame 0 is the wrapper, the breakpoint's function)."""
    native = [f for f in stack.frames if f.address]
    return native[1] if len(native) > 1 else None
