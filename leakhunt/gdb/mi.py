"""One gdb process speaking GDB/MI over pipes: tokens on commands, records parsed by pygdbmi.

We spawn gdb ourselves instead of using pygdbmi's GdbController because its reader waits for
"more output" after every response (0.2 s by default), which a thread stopped at a breakpoint
would pay on every hit; here a read returns as soon as complete lines are there, and commands
can be pipelined (sent back to back, matched to their results by token).
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field

from pygdbmi.gdbmiparser import parse_response

from leakhunt.errors import LeakhuntError

#: Environment variables that tell the gdb-side watchdog (gdb_scripts/leakhunt_watchdog.py) who to watch.
WATCHDOG_FD_ENV = "LEAKHUNT_WATCHDOG_FD"
WATCHDOG_PID_ENV = "LEAKHUNT_WATCHDOG_PID"


class GdbDied(LeakhuntError):
    """The gdb process exited or closed its output while we were talking to it."""


class GdbTimeout(LeakhuntError):
    """gdb did not answer a command in time."""


class GdbCommandError(LeakhuntError):
    """gdb answered ^error to a command; the message is gdb's own."""


@dataclass
class Record:
    """One parsed MI line. ``kind``: result, notify (async * and =), console, log, target, output."""

    kind: str
    message: str | None
    payload: object
    token: int | None
    received: float = field(default_factory=time.monotonic)

    @property
    def is_result(self) -> bool:
        return self.kind == "result"


class MiChannel:
    """Spawn gdb in MI3 mode and exchange commands and records with it.

    gdb is started in its own session so that a Ctrl-C typed at leakhunt's terminal (SIGINT to the
    whole foreground process group) never reaches it: in MI mode gdb turns SIGINT into "interrupt
    the inferior", which would stop the target. SIGPIPE stays ignored in gdb (restore_signals=False)
    so that gdb outlives a leakhunt that died, long enough for the watchdog to detach.
    """

    def __init__(self, gdb_path: str, args: tuple[str, ...] = (), env: dict | None = None) -> None:
        watch_read, self._watch_write = os.pipe()
        child_env = dict(os.environ if env is None else env)
        child_env[WATCHDOG_FD_ENV] = str(watch_read)
        child_env[WATCHDOG_PID_ENV] = str(os.getpid())
        child_env.pop("DEBUGINFOD_URLS", None)  # never fetch debug info over the network mid-session
        try:
            self.process = subprocess.Popen(
                [gdb_path, "--nx", "--quiet", "--interpreter=mi3", *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=child_env,
                pass_fds=(watch_read,),
                start_new_session=True,
                restore_signals=False,
            )
        except OSError as e:
            os.close(self._watch_write)
            raise GdbDied(f"cannot start {gdb_path}: {e.strerror}") from None
        finally:
            os.close(watch_read)
        self._out = self.process.stdout.fileno()
        os.set_blocking(self._out, False)
        self._partial = b""
        self._queue: deque[Record] = deque()
        self._next_token = 1
        self.eof = False
        self.transcript: deque[str] = deque(maxlen=200)  # the last lines both ways, to debug a session

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None and not self.eof

    # -- writing --------------------------------------------------------------------------------

    def send(self, *commands: str) -> list[int]:
        """Write commands in one go (pipelined); return their tokens in order."""
        tokens = []
        lines = []
        for command in commands:
            token = self._next_token
            self._next_token += 1
            tokens.append(token)
            lines.append(f"{token}{command}\n")
        data = "".join(lines).encode()
        try:
            self.process.stdin.write(data)
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            self.eof = True
            raise GdbDied("gdb exited (its input pipe is closed)") from None
        self.transcript.extend(lines)
        return tokens

    # -- reading --------------------------------------------------------------------------------

    def read(self, timeout: float | None, wake_fd: int | None = None) -> list[Record]:
        """Records available now, or wait up to ``timeout`` for some (None: forever).

        ``wake_fd``, when readable, ends the wait early (another thread wants attention).
        """
        if self._queue:
            out = list(self._queue)
            self._queue.clear()
            return out
        if self.eof:
            raise GdbDied(self._death())
        fds = [self._out] + ([wake_fd] if wake_fd is not None else [])
        ready, _, _ = select.select(fds, [], [], timeout)
        if self._out not in ready:
            return []
        return self._drain()

    def _drain(self) -> list[Record]:
        chunks = []
        while True:
            try:
                chunk = os.read(self._out, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
                break
            chunks.append(chunk)
        data = self._partial + b"".join(chunks)
        *lines, self._partial = data.split(b"\n")
        records = [r for r in map(self._parse, lines) if r is not None]
        if not records and self.eof:
            raise GdbDied(self._death())
        return records

    def _parse(self, raw: bytes) -> Record | None:
        line = raw.decode(errors="replace").rstrip("\r")
        if not line or line.startswith("(gdb)"):
            return None
        self.transcript.append(line)
        r = parse_response(line)
        return Record(r["type"], r.get("message"), r.get("payload"), r.get("token"))

    def request(self, command: str, timeout: float = 30.0) -> Record:
        """Send one command and wait for its result record; other records are kept for read().

        Raises GdbCommandError on ^error, GdbTimeout, GdbDied.
        """
        return self._await(self.send(command)[0], command, timeout, [])

    def console(self, command: str, timeout: float = 30.0) -> str:
        """Run a CLI command through MI and return what it printed on the console stream."""
        text: list[str] = []
        self._await(self.send(f"-interpreter-exec console {mi_quote(command)}")[0], command, timeout, text)
        return "".join(text)

    def _await(self, token: int, command: str, timeout: float, console: list[str]) -> Record:
        """The result record of ``token``; console output meanwhile goes to ``console``, every
        other record (a breakpoint hit...) back to the queue, in order, for the next read()."""
        deadline = time.monotonic() + timeout
        others: list[Record] = []
        answer: Record | None = None
        try:
            while answer is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GdbTimeout(f"gdb did not answer {command!r} within {timeout:.0f}s")
                for record in self.read(left):
                    if answer is None and record.is_result and record.token == token:
                        answer = record
                    elif answer is None and record.kind == "console":
                        console.append(str(record.payload))
                    else:
                        others.append(record)
        finally:
            self._queue.extend(others)
        if answer.message == "error":
            raise GdbCommandError(_error_message(answer))
        return answer

    # -- ending ---------------------------------------------------------------------------------

    def release_watchdog(self) -> None:
        """Close our end of the watchdog pipe: the gdb-side helper detaches and quits."""
        if self._watch_write >= 0:
            os.close(self._watch_write)
            self._watch_write = -1

    def wait(self, timeout: float) -> bool:
        """Wait for gdb to exit; True if it did."""
        try:
            self.process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        """SIGKILL gdb: only once the target is detached or its breakpoint bytes are restored."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        self.release_watchdog()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def _death(self) -> str:
        try:
            code = self.process.wait(0.5)  # its output closed: it is exiting, learn how
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            return "gdb closed its output"
        if code < 0:
            return f"gdb was killed by signal {-code}"
        return f"gdb exited with status {code}"


def mi_quote(text: str) -> str:
    """Quote a string as an MI c-string argument."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _error_message(record: Record) -> str:
    payload = record.payload if isinstance(record.payload, dict) else {}
    return str(payload.get("msg", "gdb error")).strip()
