"""leakhunt_pyframes.py: runs inside gdb; the MI command -leakhunt-python-frames lists the Python
frames of the selected thread, so that leakhunt's stacks say which Python code mapped memory.

It reads CPython 3.11-3.13's own structures with the interpreter's debug info types: the thread
state whose native_thread_id is the selected LWP, its chain of _PyInterpreterFrame, each frame's
code object (qualified name, file, line from the location table). It only reads memory: it never
calls a function in the target, so it is as safe as a backtrace. Each Python frame is attached to
the C frame (_PyEval_EvalFrameDefault) that runs it, by gdb frame level.

    (gdb) source gdb_scripts/leakhunt_pyframes.py
    -leakhunt-python-frames --thread 3
    ^done,frames=[{function="Pool.grow",filename="/srv/app/pool.py",line="42",level="7"},...]

Without debug info for the interpreter the answer is an empty list and a reason.
"""

import gdb

EVAL_FRAMES = ("_PyEval_EvalFrameDefault", "PyEval_EvalFrameEx")
FRAME_OWNED_BY_CSTACK = 3  # 3.12+: a shim frame marking where a C call entered the interpreter
MAX_FRAMES = 256  # a corrupt chain must not loop forever
_code_cache = {}  # code object address -> (name, filename, firstlineno, linetable)


class PythonUnavailable(Exception):
    pass


def _fields(type_name):
    try:
        return {f.name for f in gdb.lookup_type(type_name).fields()}
    except gdb.error:
        raise PythonUnavailable(
            f"no debug info for CPython ({type_name}): install the interpreter's debug "
            "symbols (python3-dbg) for Python frames"
        ) from None


def _thread_state(lwp):
    """The PyThreadState of the thread with this LWP, or None (a thread that never ran Python)."""
    if "native_thread_id" not in _fields("PyThreadState"):
        raise PythonUnavailable("this CPython is older than 3.11: Python frames are not read")
    runtime = gdb.parse_and_eval("_PyRuntime")
    interp = runtime["interpreters"]["head"]
    while int(interp) != 0:
        tstate = interp["threads"]["head"]
        while int(tstate) != 0:
            if int(tstate["native_thread_id"]) == lwp:
                return tstate
            tstate = tstate["next"]
        interp = interp["next"]
    return None


def _read_bytes(address, length):
    if length <= 0:
        return b""
    return bytes(gdb.selected_inferior().read_memory(address, length))


def _unicode(obj):
    """The text of a PyUnicodeObject (compact forms, which code objects' strings always are)."""
    ascii_type = gdb.lookup_type("PyASCIIObject")
    op = obj.cast(ascii_type.pointer())
    length = int(op["length"])
    state = op["state"]
    kind = int(state["kind"])
    if int(state["ascii"]):
        data = int(op) + ascii_type.sizeof
    else:
        data = int(op) + gdb.lookup_type("PyCompactUnicodeObject").sizeof
    raw = _read_bytes(data, min(length, 4096) * kind)
    return raw.decode({1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind], errors="replace")


def _bytes(obj):
    op = obj.cast(gdb.lookup_type("PyBytesObject").pointer())
    size = int(op["ob_base"]["ob_size"])
    return _read_bytes(int(op["ob_sval"].address), min(size, 1 << 20))


def _code(code_ptr):
    key = int(code_ptr)
    cached = _code_cache.get(key)
    if cached is None:
        code = code_ptr.cast(gdb.lookup_type("PyCodeObject").pointer())
        fields = _fields("PyCodeObject")
        name = _unicode(code["co_qualname" if "co_qualname" in fields else "co_name"])
        cached = (
            name,
            _unicode(code["co_filename"]),
            int(code["co_firstlineno"]),
            _bytes(code["co_linetable"]),
            int(code["co_code_adaptive"].address),
        )
        _code_cache[key] = cached
    return cached


def _varint(table, i):
    b = table[i]
    i += 1
    value = b & 63
    shift = 0
    while b & 64:
        b = table[i]
        i += 1
        shift += 6
        value |= (b & 63) << shift
    return value, i


def _svarint(table, i):
    value, i = _varint(table, i)
    return (-(value >> 1) if value & 1 else value >> 1), i


def line_of(firstlineno, table, lasti):
    """Line of the code unit ``lasti`` from a 3.11+ location table (Objects/locations.md)."""
    if lasti < 0:
        return firstlineno
    line, addr, i = firstlineno, 0, 0
    while i < len(table):
        first = table[i]
        i += 1
        code = (first >> 3) & 15
        end = addr + (first & 7) + 1
        found = None
        if code == 15:
            found = None
        elif code == 14:
            delta, i = _svarint(table, i)
            line += delta
            for _ in range(3):
                _, i = _varint(table, i)
            found = line
        elif code == 13:
            delta, i = _svarint(table, i)
            line += delta
            found = line
        elif code in (10, 11, 12):
            line += code - 10
            i += 2
            found = line
        else:
            i += 1
            found = line
        if addr <= lasti < end:
            return found if found is not None else firstlineno
        addr = end
    return firstlineno


def _eval_levels():
    levels = []
    frame = gdb.newest_frame()
    level = 0
    while frame is not None and level < 4096:
        if frame.name() in EVAL_FRAMES:
            levels.append(level)
        frame = frame.older()
        level += 1
    return levels


def python_frames():
    """[(function, filename, line, eval C frame level)] of the selected thread, innermost first."""
    thread = gdb.selected_thread()
    tstate = _thread_state(thread.ptid[1])
    if tstate is None:
        return []
    fields = _fields("PyThreadState")
    frame = tstate["current_frame"] if "current_frame" in fields else tstate["cframe"]["current_frame"]
    frame_fields = _fields("_PyInterpreterFrame")
    levels = _eval_levels()
    out, index = [], 0
    while int(frame) != 0 and len(out) < MAX_FRAMES:
        owner = int(frame["owner"]) if "owner" in frame_fields else 0
        if "is_entry" not in frame_fields and owner == FRAME_OWNED_BY_CSTACK:
            index += 1  # 3.12+: the shim below a C-level entry into the interpreter
            frame = frame["previous"]
            continue
        code_ptr = frame["f_executable"] if "f_executable" in frame_fields else frame["f_code"]
        name, filename, firstlineno, table, first_instr = _code(code_ptr)
        instr = frame["instr_ptr"] if "instr_ptr" in frame_fields else frame["prev_instr"]
        lasti = (int(instr) - first_instr) // 2
        level = levels[min(index, len(levels) - 1)] if levels else -1
        out.append((name, filename, line_of(firstlineno, table, lasti), level))
        if "is_entry" in frame_fields and int(frame["is_entry"]):
            index += 1  # 3.11: the first frame this C-level eval call ran
        frame = frame["previous"]
    return out


class PythonFramesCommand(gdb.MICommand):
    """-leakhunt-python-frames: the selected thread's Python frames (see the module docstring)."""

    def __init__(self):
        super().__init__("-leakhunt-python-frames")

    def invoke(self, argv):
        try:
            frames = python_frames()
        except PythonUnavailable as e:
            return {"frames": [], "unavailable": str(e)}
        except (gdb.error, gdb.MemoryError, KeyError, ValueError, IndexError) as e:
            return {"frames": [], "error": str(e)}
        return {
            "frames": [
                {"function": f, "filename": fn, "line": str(line), "level": str(level)}
                for f, fn, line, level in frames
            ]
        }


PythonFramesCommand()
