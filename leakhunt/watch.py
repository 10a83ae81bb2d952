"""watch's loop as a library: one process (a tree of one), or the tree under it, sampled at the interval until
the duration, Ctrl-C or the target's end; then the summary and the --json document. The live
view and the final one are WatchViews, rendered by leakhunt.render.watch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from leakhunt.analysis.processes import ProcessReport, process_reports, tree_document
from leakhunt.analysis.summary import MemorySummary, summarize
from leakhunt.gpu import NvmlReader
from leakhunt.proc.sampler import History, Sample
from leakhunt.proc.target import Target
from leakhunt.proc.tree import TreeSampler
from leakhunt.record import SessionWriter, TreeRecorder


@dataclass(frozen=True)
class WatchView:
    """What one look at the target shows: its history (for a tree, the totals with shared memory
    counted once), its summary, and each process's report and RSS series."""

    target: Target
    history: History
    summary: MemorySummary
    interval: float
    duration: float | None
    subprocesses: bool = False  # the tree under the target was followed
    processes: list[ProcessReport] = field(default_factory=list)
    rss_series: dict[int, list[int]] = field(default_factory=dict)  # each process's, for sparklines
    live_processes: int = 1


@dataclass(frozen=True)
class WatchResult:
    view: WatchView  # the final one: the summary's
    document: dict  # --json, and the recording's summary
    stopped_because: str
    error: Exception | None  # the target was lost mid-run

    @property
    def summary(self) -> MemorySummary:
        return self.view.summary


#: Called at every sample with whether it is the first, and a way to build the view (built only
#: when a live display wants it).
OnSample = Callable[[bool, Callable[[], WatchView]], None]


def watch(
    target: Target,
    interval: float,
    duration: float | None,
    warmup: float | None = None,
    writer: SessionWriter | None = None,
    gpu: NvmlReader | None = None,
    full_every: int = 1,
    subprocesses: bool = False,
    on_sample: OnSample | None = None,
) -> WatchResult:
    """Watch ``target`` (with ``subprocesses``, the tree under it) until ``duration``, Ctrl-C or
    its end. One process is a tree of one: the same sampler, document and recording."""
    sampler = TreeSampler(
        target, interval, keep_raw=writer is not None, gpu=gpu, full_every=full_every, follow=subprocesses
    )
    recorder = TreeRecorder(writer, follow=subprocesses) if writer else None

    def view(summary: MemorySummary, final: bool = False) -> WatchView:
        return WatchView(
            target,
            sampler.tree,
            summary,
            interval,
            None if final else duration,
            subprocesses,
            process_reports(sampler, summary, warmup),
            {pid: t.history.rss for pid, t in sampler.tracks.items()},
            len(sampler.live_tracks()),
        )

    def each(samples: list[Sample], _: TreeSampler, tree: History) -> None:
        if recorder:
            recorder(samples, sampler, tree)
        if on_sample:
            on_sample(len(tree) == 1, lambda: view(summarize(tree, warmup_s=warmup, pid=target.pid)))

    result = sampler.run(duration, each)
    if recorder:
        recorder.flush_last()
    summary = summarize(result.tree, warmup_s=warmup, pid=target.pid).with_true_orphans()
    final = view(summary, final=True)
    document = {
        **summary.to_json(),
        "full_samples": sampler.full_samples,
        "pid": target.pid,
        "nspid": list(target.nspid),
        "cmdline": target.cmdline,
        "subprocesses": subprocesses,
        "stopped_because": result.stopped_because,
        "sample_cost_s": sum(result.tree.cost_s) / len(result.tree),
        "tree": tree_document(sampler),
        "processes": [p.to_json() for p in final.processes],
    }
    return WatchResult(final, document, result.stopped_because, result.error)
