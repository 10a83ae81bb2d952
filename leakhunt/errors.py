"""Exceptions that library code raises and the CLI turns into one line and exit code 2."""

from __future__ import annotations


class LeakhuntError(Exception):
    """An error with a message fit to show a person as one line (the CLI exits 2)."""


class TargetGone(LeakhuntError):
    """The target process does not exist, or exited while we looked at it."""

    def __init__(self, pid: int, detail: str = "") -> None:
        self.pid = pid
        super().__init__(detail or f"no process with pid {pid}")


class AccessDenied(LeakhuntError):
    """We may not read or trace the target (ownership, ptrace_scope, capabilities)."""


class BackendUnavailable(LeakhuntError):
    """A tracer backend cannot run here; `reason` says why and `fix` how to fix it."""

    def __init__(self, backend: str, reason: str, fix: str = "run `leakhunt doctor --install`") -> None:
        self.backend = backend
        self.reason = reason
        self.fix = fix
        super().__init__(f"{backend} unavailable: {reason}" + (f" ({fix})" if fix else ""))


class BadInput(LeakhuntError):
    """A file or argument we were given cannot be used (truncated smaps, unknown format...)."""


class CorruptRecording(LeakhuntError):
    """A session directory that cannot be read back."""
