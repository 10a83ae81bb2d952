"""Python frames in gdb stacks: load our gdb-side reader (gdb_scripts/leakhunt_pyframes.py) when
the target runs CPython, and say plainly when it cannot work (no debug info for the interpreter).

The reader only reads memory (it never calls a function in the target), so it is as safe as
``-stack-list-frames``; it needs the interpreter's DWARF types, which pyenv/uv/conda builds and
Debian's python3-dbg have and most distribution pythons lack.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import PurePosixPath

from leakhunt.gdb.memory import AddressSpace
from leakhunt.gdb.mi import GdbCommandError, GdbTimeout, MiChannel
from leakhunt.resources import gdb_script

_PYTHON_OBJECT = re.compile(r"^(libpython3\.\d+.*\.so.*|python3(\.\d+)?)$")
MI_COMMAND = "-leakhunt-python-frames"


def python_object(space: AddressSpace) -> str | None:
    """The object holding the target's CPython interpreter, if it has one."""
    for mapping in space.mappings:
        if mapping.is_file and _PYTHON_OBJECT.match(PurePosixPath(mapping.path).name):
            return mapping.path
    return None


def python_frames_helper(mi: MiChannel, space: AddressSpace, note: Callable[[str], None]) -> bool:
    """Load the reader into gdb if the target runs CPython; True when hits may ask it for frames.

    Called before `attach`: the reader checks the interpreter's debug info lazily, at the first
    hit, and answers an empty list (with a reason, noted once) when it has none."""
    if python_object(space) is None:
        return False
    try:
        mi.console(f"source {gdb_script('leakhunt_pyframes.py')}")
    except (GdbCommandError, GdbTimeout) as e:
        note(f"Python frames unavailable: this gdb cannot load Python helpers ({e})")
        return False
    return True
