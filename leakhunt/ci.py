"""The CI regression gate: sample a process, or a command the gate starts and always stops, for a
while and decide whether its memory grows faster than a limit.

The decision is the verdict of analysis/verdict.py with the limit as its floor: the lower end of
the slope's 95% interval must exceed the limit, and growth that levelled off (a pool filled once)
or that is within the noise does not fail the gate. commands/ci.py renders the GateResult as text,
JSON, JUnit XML and GitHub Actions annotations.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from leakhunt.analysis.device import device_json, open_nvml
from leakhunt.analysis.processes import ProcessReport, process_reports, tree_document
from leakhunt.analysis.summary import MemorySummary, summarize
from leakhunt.analysis.verdict import judge
from leakhunt.errors import BadInput, LeakhuntError, TargetGone
from leakhunt.heap import HeapRun
from leakhunt.proc.sampler import STOP_INTERRUPTED, History
from leakhunt.proc.target import Target, die_with_parent, open_target
from leakhunt.proc.tree import TreeSampler
from leakhunt.units import format_duration, format_rate

PASS, FAIL, ERROR = 0, 1, 2
#: How long a stopped command gets between SIGINT, SIGTERM and SIGKILL. SIGINT first: a Python
#: program (and memray tracking it) unwinds and flushes on KeyboardInterrupt, not on SIGTERM.
STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class GateConfig:
    max_slope: float  # bytes per second
    duration: float  # seconds of sampling
    interval: float = 1.0
    warmup: float | None = None  # None: verdict.default_warmup
    max_device_slope: float | None = None  # bytes per second of device memory (NVML); None: not gated

    def describe(self) -> str:
        warmup = "default warm-up" if self.warmup is None else f"{format_duration(self.warmup)} warm-up"
        device = (
            f", device memory limit {format_rate(self.max_device_slope)}"
            if self.max_device_slope is not None
            else ""
        )
        return (
            f"limit {format_rate(self.max_slope)}{device}, {format_duration(self.duration)} every "
            f"{format_duration(self.interval)}, {warmup}"
        )


@dataclass(frozen=True)
class GateResult:
    """What the gate saw and decided. ``summary`` is None only when no sample was taken."""

    config: GateConfig
    target: str  # what was measured, for people: the command line or pid
    pid: int | None
    summary: MemorySummary | None
    exit_code: int  # PASS, FAIL or ERROR
    reason: str  # one sentence
    stopped_because: str = ""
    notes: tuple[str, ...] = ()
    elapsed_s: float = 0.0
    heap_growth: float | None = None  # Python heap growth memray saw (--heap), bytes
    device_unavailable: str | None = None  # why device memory (NVML) was not sampled
    nspid: tuple[int, ...] = ()  # the pid in each pid namespace (a container's own last)
    subprocesses: bool = False
    processes: tuple[ProcessReport, ...] = ()  # one per process sampled: a tree of one has one
    tree: dict = field(default_factory=dict)  # how the totals count (processes.tree_document)

    @property
    def status(self) -> str:
        return {PASS: "pass", FAIL: "fail", ERROR: "error"}[self.exit_code]

    def to_json(self) -> dict:
        doc = {
            "status": self.status,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "target": self.target,
            "pid": self.pid,
            "nspid": list(self.nspid),
            "max_slope_bytes_per_s": self.config.max_slope,
            "max_device_slope_bytes_per_s": self.config.max_device_slope,
            "duration_s": self.config.duration,
            "interval_s": self.config.interval,
            "warmup_s": self.config.warmup,
            "stopped_because": self.stopped_because,
            "notes": list(self.notes),
            "elapsed_s": self.elapsed_s,
            "heap_growth_bytes": self.heap_growth,
        }
        if self.summary is not None:
            doc["summary"] = self.summary.to_json()
        doc["device_memory"] = device_json(self.summary, self.device_unavailable)
        if self.summary is not None:  # the per-process document of watch and investigate
            doc["subprocesses"] = self.subprocesses
            doc["processes"] = [p.to_json() for p in self.processes]
            doc["tree"] = self.tree
        return doc


def gate_summary(history: History, config: GateConfig) -> MemorySummary:
    """The run judged with the limits as floors: RSS (and classes, groups) at ``max_slope``, the
    device memory series at ``max_device_slope`` when that is gated."""
    summary = summarize(history, warmup_s=config.warmup, min_slope=config.max_slope)
    if config.max_device_slope is None or summary.device is None:
        return summary
    verdict = judge(history.t, history.gpu, warmup_s=config.warmup, min_slope=config.max_device_slope)
    return replace(summary, device=replace(summary.device, verdict=verdict))


def decide(summary: MemorySummary, config: GateConfig) -> tuple[int, str]:
    """PASS or FAIL with the sentence that says why (ERROR when the data cannot decide). With
    ``max_device_slope`` the device memory series (judged at that floor) can fail the gate too."""
    v = summary.verdict
    limit = format_rate(config.max_slope)
    gated = config.max_device_slope is not None and summary.device is not None
    d = summary.device.verdict if gated else None
    failures = []
    if v.leak:
        failures.append(
            f"{summary.main_label} grows {format_rate(v.trend.slope)} (95% interval {format_rate(v.trend.lo)} .. "
            f"{format_rate(v.trend.hi)}): its lower bound exceeds the limit of {limit}"
        )
    if d is not None and d.leak:
        failures.append(
            f"device memory grows {format_rate(d.trend.slope)} (95% interval {format_rate(d.trend.lo)} "
            f".. {format_rate(d.trend.hi)}): its lower bound exceeds the device limit of "
            f"{format_rate(config.max_device_slope)}"
        )
    if failures:
        return FAIL, "; ".join(failures)
    if v.trend.samples < 3 or v.reason.startswith("not enough data"):
        return ERROR, f"cannot decide: {v.reason}; lengthen --duration or shorten --interval"
    device = (
        f"; device memory within {format_rate(config.max_device_slope)}: {d.reason}" if d is not None else ""
    )
    return PASS, f"within the limit of {limit}: {v.reason}{device}"


class Launched:
    """A command the gate started in its own session, so that it and everything it forked can be
    stopped together. Stopping is idempotent and escalates SIGINT -> SIGTERM -> SIGKILL.

    Nothing outlives leakhunt: the command gets SIGKILL when leakhunt dies, however it dies, and
    a guard process beside it (a shell waiting for the same signal as SIGTERM) then kills the
    command's whole process group, the processes it forked included."""

    def __init__(self, argv: Sequence[str], role: str, stdout=None) -> None:
        self.argv = list(argv)
        self.role = role
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stdout,
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGKILL),
            )
        except OSError as e:
            raise BadInput(f"{role} {shlex.join(self.argv)!r} failed to start: {e.strerror or e}") from None
        # The guard is a process group of its own: its trap takes the command's group and then
        # its own (the sleep it waits on included), and stop() kills that group whole.
        guard = f'trap "kill -KILL -{self.popen.pid} 2>/dev/null; kill -KILL 0" TERM; while :; do sleep 3600 & wait; done'
        self._guard = subprocess.Popen(
            ["sh", "-c", guard],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def describe_exit(self) -> str:
        rc = self.popen.returncode
        if rc is None:
            return "still running"
        return (
            f"killed by signal {-rc} ({signal.Signals(-rc).name})" if rc < 0 else f"exited with status {rc}"
        )

    def stop(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if self.popen.poll() is not None:
                break
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                continue
        self.popen.poll()
        # Whatever the command forked and left behind in its session goes too; so does the guard.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.killpg(self._guard.pid, signal.SIGKILL)  # the shell and its sleep
        except (ProcessLookupError, PermissionError):
            pass
        self._guard.wait()

    def __enter__(self) -> Launched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _open_started(launched: Launched) -> Target:
    try:
        return open_target(launched.pid)
    except TargetGone:
        launched.popen.wait(STOP_GRACE_S)
        raise BadInput(
            f"command {shlex.join(launched.argv)!r} {launched.describe_exit()} before it could be sampled"
        ) from None


@dataclass
class Gate:
    """Runs one gate: ``run_pid`` or ``run_command``; ``on_tick`` sees every tick (recording)."""

    config: GateConfig
    subprocesses: bool = False  # gate the whole tree under the target: its deduplicated totals
    on_tick: Callable | None = None  # TreeSampler's callback (recording)
    keep_raw: bool = False  # keep smaps text for on_tick (a recording's snapshots)
    command_output: object = None  # where a started command's stdout/stderr go (None: inherit)
    heap: HeapRun | None = None  # memray beside the run (--heap)
    notes: list[str] = field(default_factory=list)

    def run_pid(self, pid: int, load: Sequence[str] | None = None) -> GateResult:
        target = open_target(pid)
        if self.heap is None:
            return self._measure(target, target.describe(), load, command=None)
        self.heap.attach(pid, self.config.duration)
        try:
            result = self._measure(target, target.describe(), load, command=None)
        finally:
            self.heap.finish()
        return self._with_heap(result)

    def run_command(self, argv: Sequence[str], load: Sequence[str] | None = None) -> GateResult:
        if not argv:
            raise BadInput("no command given after --")
        label = shlex.join(argv)
        if self.heap is not None:
            argv = self.heap.run_argv(list(argv))
        try:
            with Launched(argv, "command", self.command_output) as launched:
                target = _open_started(launched)
                result = self._measure(target, label, load, command=launched)
        finally:
            if self.heap is not None:  # memray finishes its capture when the interpreter exits: now
                self.heap.finish()
        return self._with_heap(result)

    def _with_heap(self, result: GateResult) -> GateResult:
        if self.heap is None:
            return result
        notes = result.notes + ((self.heap.problem,) if self.heap.problem else ())
        return replace(result, heap_growth=self.heap.growth, notes=notes)

    def _measure(
        self, target: Target, label: str, load: Sequence[str] | None, command: Launched | None
    ) -> GateResult:
        began = time.monotonic()
        gpu, no_gpu = open_nvml()
        if self.config.max_device_slope is not None and gpu is None:
            # A gate that cannot fail is no gate: say so rather than pass.
            raise BadInput(f"--max-device-slope: device memory cannot be sampled here: {no_gpu}")
        loader = Launched(load, "load generator", self.command_output) if load else None
        try:
            sampler = TreeSampler(target, self.config.interval, self.keep_raw, gpu, follow=self.subprocesses)
            result = sampler.run(self.config.duration, self.on_tick)
            history = result.tree
        finally:
            if gpu is not None:
                gpu.close()
            if loader is not None:
                if loader.returncode is not None:
                    self.notes.append(f"the load generator {loader.describe_exit()} before the end")
                loader.stop()
        elapsed = time.monotonic() - began
        summary = gate_summary(history, self.config)
        processes = process_reports(sampler, summary, self.config.warmup, min_slope=self.config.max_slope)
        code, reason = decide(summary, self.config)
        if result.error is not None:
            code, reason = self._target_lost(command, result.error, history, code, reason)
        elif result.stopped_because == STOP_INTERRUPTED:
            self.notes.append(f"interrupted after {format_duration(history.duration_s)}")
        return GateResult(
            self.config,
            label,
            target.pid,
            summary,
            code,
            reason,
            result.stopped_because,
            tuple(self.notes),
            elapsed,
            device_unavailable=no_gpu,
            nspid=target.nspid,
            subprocesses=self.subprocesses,
            processes=tuple(processes),
            tree=tree_document(sampler),
        )

    def _target_lost(
        self, command: Launched | None, error: Exception, history: History, code: int, reason: str
    ) -> tuple[int, str]:
        """A command that finished by itself with status 0 is a finite workload: judge what was
        seen. Anything else that ends the target early (a crash, a pid that exited) is an error."""
        after = f"after {format_duration(history.duration_s)}"
        if command is not None:
            try:
                command.popen.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            if command.returncode == 0:
                self.notes.append(f"the command exited with status 0 {after}, before the end of the run")
                return code, reason
            self.notes.append(reason)
            return ERROR, f"the command {command.describe_exit()} {after}, during the run"
        self.notes.append(reason)
        return ERROR, f"{error} {after}, during the run"


def error_result(config: GateConfig, target: str, error: LeakhuntError) -> GateResult:
    """The result written to JUnit and the step summary when the gate could not measure at all."""
    return GateResult(config, target, None, None, ERROR, str(error))
