"""One tracer over a process tree (or a tree of one): what `investigate` runs.

Children forked after the start are followed by the backend itself (TraceOptions.follow: the
kernel side adds them at fork). Processes that already exist are added to it: the BCC program
reads its set of traced pids from a map, so they go straight in; bpftrace's set is fixed when its
script starts, so each existing child gets a session of its own (which follows that child's later
children). Outstanding mappings keep the pid they live in; the correlator never mixes address spaces.
"""

from __future__ import annotations

from leakhunt.errors import AccessDenied, BackendUnavailable, TargetGone
from leakhunt.proc.target import PROC, Target
from leakhunt.proc.tree import descendants
from leakhunt.record import SessionWriter
from leakhunt.trace.backend import Backend, TraceOptions, TraceStats
from leakhunt.trace.events import Outstanding
from leakhunt.trace.patched import find_patched, patched_note
from leakhunt.trace.session import BackendChoice, TraceSession


def add_traced_pid(backend: Backend, pid: int) -> bool:
    """Add an existing process to a following backend's set of traced pids: True when it is
    traced now (or was from the start: options.existing), False when the backend cannot."""
    if not backend.options.follow:
        return False
    if backend.takes_existing and pid in backend.options.existing:
        return True  # in the set it started with
    return backend.add_pid(pid)


def heap_end(pid: int) -> int | None:
    """The program break now (the end of [heap]): brk growth is counted from it."""
    try:
        for line in (PROC / str(pid) / "maps").read_text().splitlines():
            if line.endswith("[heap]"):
                return int(line.split("-")[1].split()[0], 16)
    except (OSError, ValueError):
        pass
    return None


def seed_pid(session: TraceSession, pid: int) -> str | None:
    """What a session needs of a process added to it while running: its program break (brk growth
    is counted from it), and the note when its libc is patched (no uprobes there)."""
    end = heap_end(pid)
    if end is not None:
        session.ledger.set_brk(pid, end)
    resolver = getattr(session.backend, "resolver", None)
    try:
        note = patched_note(find_patched(pid, resolver))
    except (OSError, ValueError):
        return None
    return f"pid {pid}: {note}" if note else None


def adopt_existing(session: TraceSession) -> list[str]:
    """Add the processes already under a following session's target to it (the backend follows
    the ones forked later); returns notes, including what could not be added and why."""
    notes, missed = [], 0
    for pid in descendants(session.target.pid):
        if not add_traced_pid(session.backend, pid):
            missed += 1
        elif (note := seed_pid(session, pid)) and note not in notes:
            notes.append(note)
    if missed:
        notes.append(
            f"{missed} process{'es' if missed > 1 else ''} already under pid {session.target.pid} "
            f"{'are' if missed > 1 else 'is'} not traced by the {session.backend.name} backend"
        )
    return notes


class TreeTrace:
    """Trace sessions over a root and the processes under it, read as one."""

    def __init__(
        self, root: Target, choice: BackendChoice, options: TraceOptions, writer: SessionWriter | None = None
    ) -> None:
        self.root = root
        self.choice = choice
        self.options = options
        self.writer = writer
        self.sessions: list[TraceSession] = []
        self.own_session: dict[int, TraceSession] = {}  # existing children bpftrace traces apart
        self.notes: list[str] = []

    @property
    def main(self) -> TraceSession:
        return self.sessions[0]

    def start(self) -> None:
        """Attach to the root, following its future children when options.follow; the processes
        of the tree that exist already are adopted next. Errors attaching to the root propagate."""
        session = TraceSession(self.root, self.choice.cls(self.root, self.options), self.writer)
        session.start()
        self.sessions.append(session)

    def adopt(self, target: Target, existed: bool = False) -> None:
        """Trace one more process of the tree. One that ``existed`` before the start is added to
        the backend, or given its own session; one found later was forked by a traced process and
        is followed already (BCC still learns where its libc lies, for exact call-site keys)."""
        if not self.options.follow or target.pid == self.root.pid or target.pid in self.own_session:
            return
        if add_traced_pid(self.main.backend, target.pid):
            self._seed(self.main, target.pid)
            return
        if not existed:
            return
        try:
            session = TraceSession(
                target, self.choice.cls(target, self.options)
            )  # recorded by the main one only
            session.start()
        except (BackendUnavailable, TargetGone, AccessDenied) as e:
            self.notes.append(f"pid {target.pid} is not traced: {e}")
            return
        self.sessions.append(session)
        self.own_session[target.pid] = session

    def _seed(self, session: TraceSession, pid: int) -> None:
        note = seed_pid(session, pid)
        if note and note not in self.notes:
            self.notes.append(note)

    def step(self, timeout: float) -> None:
        share = timeout / len(self.sessions)
        for session in self.sessions:
            session.step(share)

    def stop(self, reason: str) -> None:
        """Detach every session; the ledgers are final after this."""
        for session in self.sessions:
            session.traced_s = session.elapsed
            session.stopped_because = reason
            session.stop()

    def outstanding(self, pid: int | None = None) -> list[Outstanding]:
        """Traced mappings still held, each with its caller and stack; of one pid if given. A child
        forked while its own session started is seen by two sessions: its mappings count once."""
        out, seen = [], set()
        for session in self.sessions:
            info = session.ledger.site_info
            for o in session.ledger.outstanding():
                if (pid is not None and o.pid != pid) or (o.pid, o.start) in seen:
                    continue
                seen.add((o.pid, o.start))
                caller, stack = info.get(o.site, (None, None))
                out.append(Outstanding(o.pid, o.start, o.end - o.start, caller, stack, o.ts / 1e9))
        return out

    @property
    def stats(self) -> TraceStats:
        """Events and losses of every session together, and every note once."""
        total = TraceStats(notes=list(self.notes))
        for session in self.sessions:
            s = session.backend.stats
            total.events += s.events
            total.lost_events += s.lost_events
            total.filtered += s.filtered
            total.untracked += s.untracked
            total.backlog += s.backlog
            if s.complete_until is not None:
                total.complete_until = min(total.complete_until or s.complete_until, s.complete_until)
            total.notes += [n for n in s.notes if n not in total.notes]
        return total

    @property
    def elapsed(self) -> float:
        return self.main.elapsed if self.sessions else 0.0
