"""The report's plots, drawn with matplotlib (Agg, no display) into PNG bytes.

Each function takes plain series and returns PNG bytes; colours of region classes are fixed here
so that a class looks the same in every plot and every report.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, MultipleLocator  # noqa: E402

from leakhunt.analysis.slope import Trend  # noqa: E402
from leakhunt.proc.classes import RegionClass  # noqa: E402
from leakhunt.units import format_bytes, format_rate  # noqa: E402

CLASS_COLORS = {
    RegionClass.ANON: "#d62728",
    RegionClass.HEAP: "#ff7f0e",
    RegionClass.SHM: "#9467bd",
    RegionClass.PINNED: "#8c564b",
    RegionClass.GPU: "#e377c2",
    RegionClass.LIB: "#1f77b4",
    RegionClass.FILE: "#17becf",
    RegionClass.STACK: "#bcbd22",
    RegionClass.SPECIAL: "#7f7f7f",
}
SERIES_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
INK, MUTED, GRID = "#1f2933", "#6b7785", "#e4e7eb"
WIDTH, HEIGHT, DPI = 9.6, 3.6, 130

plt.rcParams.update(
    {
        "font.size": 9.5,
        "axes.edgecolor": GRID,
        "axes.labelcolor": MUTED,
        "axes.titlesize": 11,
        "axes.titleweight": "bold",
        "axes.titlecolor": INK,
        "axes.titlelocation": "left",
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.color": GRID,
        "grid.linewidth": 0.8,
        "xtick.color": MUTED,
        "ytick.color": MUTED,
        "legend.frameon": False,
        "legend.fontsize": 8.5,
        "figure.facecolor": "white",
        "svg.fonttype": "none",
    }
)


def _nice_step(span: float, ticks: int = 5) -> float:
    """A tick step that reads well in binary units: 1, 2 or 5 times a power of ten of KiB/MiB/GiB."""
    raw = max(span / ticks, 1.0)
    unit = 1024 ** min(3, max(0, int(math.log(raw, 1024))))
    scaled = raw / unit
    decade = 10 ** math.floor(math.log10(scaled))
    return unit * decade * next(m for m in (1, 2, 5, 10) if m * decade >= scaled)


def _bytes_axis(ax, signed: bool = False, axis: str = "y") -> None:
    """Call after plotting: ticks at round binary sizes over the current limits."""
    get_lim, set_lim, which = (
        (ax.get_ylim, ax.set_ylim, ax.yaxis) if axis == "y" else (ax.get_xlim, ax.set_xlim, ax.xaxis)
    )
    lo, hi = get_lim()
    which.set_major_locator(MultipleLocator(_nice_step(hi - lo)))
    which.set_major_formatter(FuncFormatter(lambda v, _: format_bytes(v, signed=signed and v != 0)))
    set_lim(lo, hi)


def _time_axis(ax, t: Sequence[float]) -> None:
    span = (max(t) - min(t)) if len(t) else 0
    if span >= 180:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(v // 60)}m{int(v % 60):02d}"))
    else:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}s"))
    ax.set_xlabel("time since the first sample")
    if span > 0:  # a single sample has no span: leave matplotlib its own margins
        ax.set_xlim(min(t), max(t))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def _growth_png(fig, ax, t: Sequence[float], title: str) -> bytes:
    """Finish a plot of growth since the first sample: the zero line, legend, signed byte axis."""
    ax.axhline(0, color=MUTED, lw=0.8)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title)
    _bytes_axis(ax, signed=True)
    _time_axis(ax, t)
    return _png(fig)


def _shade_warmup(ax, t0: float, warmup_s: float) -> None:
    if warmup_s > 0:
        ax.axvspan(t0, t0 + warmup_s, color="#f0f2f5", zorder=0, lw=0)
        ax.text(
            t0 + warmup_s / 2,
            0.97,
            "warm-up",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=8,
            color=MUTED,
        )


def _stacked(
    t: np.ndarray,
    layers: list[np.ndarray],
    colors: list[str],
    labels: list[str],
    title: str,
    warmup_s: float = 0.0,
) -> bytes:
    """Stacked areas over time, the legend listed top layer first like the areas."""
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    ax.stackplot(t, *layers, colors=colors, labels=labels, alpha=0.85, lw=0)
    _shade_warmup(ax, t[0], warmup_s)
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], names[::-1], loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title)
    _bytes_axis(ax)
    _time_axis(ax, t)
    return _png(fig)


def rss_by_class(t: np.ndarray, classes: dict[RegionClass, np.ndarray], warmup_s: float) -> bytes:
    """Stacked areas, the class that grew most on top where the eye lands."""
    order = sorted(classes, key=lambda c: (classes[c][-1] - classes[c][0], classes[c][-1]))
    return _stacked(
        t,
        [classes[c] for c in order],
        [CLASS_COLORS[c] for c in order],
        [f"{c.value}  {format_bytes(classes[c][-1])}" for c in order],
        "RSS by region class",
        warmup_s,
    )


def group_growth(t: np.ndarray, series: list[tuple[str, RegionClass, np.ndarray]]) -> bytes:
    """Growth since the first sample of the top growing (class, path) groups."""
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    for i, (label, klass, y) in enumerate(series):
        ax.plot(
            t,
            y - y[0],
            lw=2,
            color=SERIES_COLORS[i % len(SERIES_COLORS)],
            label=f"{_shorten(label)}  ({klass.value}) {format_bytes(y[-1] - y[0], signed=True)}",
        )
    return _growth_png(fig, ax, t, "Top growing groups: growth since the first sample")


def slope_fit(
    t: np.ndarray, y: np.ndarray, trend: Trend, tail: Trend | None, warmup_s: float, leak: bool
) -> bytes:
    """Samples, the Theil–Sen line and the band its 95% slope interval spans around the fit's
    centre (Sen's interval pivots there), the tail's own fit when it was judged separately."""
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    kept = t >= t[0] + warmup_s
    ax.scatter(t[~kept], y[~kept], s=10, color="#b8c0ca", label="warm-up (not fitted)", zorder=3)
    ax.scatter(t[kept], y[kept], s=10, color=INK, label="samples", zorder=3)
    color = "#d62728" if leak else "#2ca02c"
    if math.isfinite(trend.slope) and kept.sum() >= 2:
        tk = t[kept]
        tc = float(np.median(tk))
        yc = trend.intercept + trend.slope * tc
        ax.plot(
            tk,
            trend.intercept + trend.slope * tk,
            color=color,
            lw=2,
            label=f"Theil–Sen fit {format_rate(trend.slope)}",
            zorder=4,
        )
        if math.isfinite(trend.lo) and math.isfinite(trend.hi):
            lo, hi = yc + trend.lo * (tk - tc), yc + trend.hi * (tk - tc)
            ax.fill_between(
                tk,
                np.minimum(lo, hi),
                np.maximum(lo, hi),
                color=color,
                alpha=0.15,
                lw=0,
                label=f"95% interval [{format_rate(trend.lo)} .. {format_rate(trend.hi)}]",
            )
    if tail is not None and math.isfinite(tail.slope) and tail.samples >= 3:
        tt = t[t >= t[-1] - tail.duration_s - 1e-9]
        ax.plot(
            tt,
            tail.intercept + tail.slope * tt,
            color="#ff7f0e",
            lw=1.6,
            ls="--",
            label=f"last {len(tt)} samples {format_rate(tail.slope)}",
            zorder=5,
        )
    _shade_warmup(ax, t[0], warmup_s)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Total RSS and its fitted slope")
    _bytes_axis(ax)
    _time_axis(ax, t)
    return _png(fig)


def class_rates(rows: list[tuple[RegionClass, Trend, bool]]) -> bytes:
    """Each class's slope with its 95% interval: which kinds of memory grow significantly."""
    fig, ax = plt.subplots(figsize=(WIDTH, 0.45 * len(rows) + 1.1))
    per_min = 60 / 2**20
    for i, (klass, trend, leak) in enumerate(rows):
        slope = trend.slope if math.isfinite(trend.slope) else 0.0
        ax.barh(i, slope * per_min, color=CLASS_COLORS[klass], alpha=0.9 if leak else 0.45, height=0.6)
        if math.isfinite(trend.lo) and math.isfinite(trend.hi):
            ax.errorbar(
                slope * per_min,
                i,
                xerr=[[max(0.0, (slope - trend.lo) * per_min)], [max(0.0, (trend.hi - slope) * per_min)]],
                color=INK,
                capsize=3,
                lw=1,
            )
        ax.text(
            1.01,
            i,
            format_rate(trend.slope) + ("  leak" if leak else ""),
            transform=ax.get_yaxis_transform(),
            va="center",
            fontsize=8.5,
            color="#d62728" if leak else MUTED,
        )
    ax.set_yticks(range(len(rows)), [k.value for k, _, _ in rows])
    ax.invert_yaxis()
    ax.axvline(0, color=MUTED, lw=0.8)
    ax.set_xlabel("MiB/min (bars: fitted slope; whiskers: 95% interval)")
    ax.set_title("Growth rate by class")
    ax.grid(axis="y", visible=False)
    return _png(fig)


def heap_vs_rss(t: np.ndarray, rss_growth: np.ndarray, heap_growth: np.ndarray) -> bytes:
    """Growth of RSS and of the Python heap from the same start: the gap is memory no heap
    profiler can see."""
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    ax.plot(
        t, rss_growth, color="#d62728", lw=2, label=f"RSS growth {format_bytes(rss_growth[-1], signed=True)}"
    )
    ax.plot(
        t,
        heap_growth,
        color="#1f77b4",
        lw=2,
        label=f"Python heap growth (memray) {format_bytes(heap_growth[-1], signed=True)}",
    )
    ax.fill_between(
        t,
        heap_growth,
        rss_growth,
        where=rss_growth > heap_growth,
        color="#d62728",
        alpha=0.12,
        lw=0,
        label="not on the heap",
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("RSS versus the Python heap")
    _bytes_axis(ax, signed=True)
    _time_axis(ax, t)
    return _png(fig)


def device_vs_rss(
    t: np.ndarray, device: np.ndarray, rss: np.ndarray, trend: Trend, warmup_s: float, leak: bool
) -> bytes:
    """Growth of device memory (NVML) and of host RSS from the same start, with the device
    series' Theil–Sen fit: a GPU leak is the line that climbs while RSS stays flat."""
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    color = "#d62728" if leak else "#2ca02c"
    ax.plot(
        t,
        device - device[0],
        color=CLASS_COLORS[RegionClass.GPU],
        lw=2,
        label=f"device memory (NVML) {format_bytes(device[-1] - device[0], signed=True)}",
    )
    ax.plot(
        t, rss - rss[0], color=INK, lw=1.6, label=f"host RSS {format_bytes(rss[-1] - rss[0], signed=True)}"
    )
    kept = t >= t[0] + warmup_s
    if math.isfinite(trend.slope) and kept.sum() >= 2:
        tk = t[kept]
        ax.plot(
            tk,
            trend.intercept + trend.slope * tk - device[0],
            color=color,
            lw=1.4,
            ls="--",
            label=f"device fit {format_rate(trend.slope)}",
        )
    _shade_warmup(ax, t[0], warmup_s)
    return _growth_png(fig, ax, t, "Device memory versus host RSS: growth since the first sample")


def charges(
    t: np.ndarray,
    footprint: np.ndarray,
    rss: np.ndarray,
    held: np.ndarray | None,
    cgroup: np.ndarray | None,
    cgroup_limit: float | None,
    dev_shm: np.ndarray | None,
    warmup_s: float,
) -> bytes:
    """What the kernel charges against what RSS says, as growth since the first sample: the
    footprint (private memory plus held shared objects), RSS, the held objects, the memory
    cgroup's charge (its headroom to the limit in the legend) and /dev/shm's fill."""
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))

    def line(values: np.ndarray, label: str, **style) -> None:
        ax.plot(
            t,
            values - values[0],
            label=f"{label} {format_bytes(values[-1] - values[0], signed=True)}",
            **style,
        )

    line(footprint, "footprint", color="#d62728", lw=2.2)
    line(rss, "RSS", color=INK, lw=1.6)
    if held is not None:
        line(held, "held shared objects", color=CLASS_COLORS[RegionClass.SHM], lw=1.6)
    if cgroup is not None:
        headroom = f" ({format_bytes(cgroup_limit - cgroup[-1])} to its limit)" if cgroup_limit else ""
        line(cgroup, f"memory cgroup{headroom}", color="#1f77b4", lw=1.4, ls="--")
    if dev_shm is not None:
        line(dev_shm, "/dev/shm used", color="#9467bd", lw=1.2, ls=":")
    _shade_warmup(ax, t[0], warmup_s)
    return _growth_png(
        fig, ax, t, "What the kernel charges, and what RSS shows: growth since the first sample"
    )


def attribution(labels: list[str], values: list[float], unexplained: float | None) -> bytes:
    """Bytes each culprit explains, and what nothing explains."""
    names = [_shorten(label, 60) for label in labels] + (["unexplained"] if unexplained else [])
    vals = list(values) + ([unexplained] if unexplained else [])
    fig, ax = plt.subplots(figsize=(WIDTH, 0.5 * len(names) + 1.1))
    colors = [SERIES_COLORS[i % len(SERIES_COLORS)] for i in range(len(labels))] + ["#b8c0ca"] * bool(
        unexplained
    )
    ax.barh(range(len(names)), vals, color=colors, height=0.6)
    for i, v in enumerate(vals):
        ax.text(v, i, "  " + format_bytes(v), va="center", fontsize=8.5, color=INK)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    _bytes_axis(ax, axis="x")
    ax.set_title("Growth attributed to callers")
    ax.grid(axis="y", visible=False)
    return _png(fig)


def outstanding_by_caller(t: np.ndarray, callers: Sequence[str], values: np.ndarray) -> bytes:
    """Outstanding (mapped, not yet unmapped) bytes by caller over time, stacked."""
    return _stacked(
        t,
        list(values.T),
        SERIES_COLORS[: len(callers)],
        [f"{_shorten(c)}  {format_bytes(values[-1, i])}" for i, c in enumerate(callers)],
        "Outstanding mapped bytes by caller",
    )


def _shorten(label: str, width: int = 44) -> str:
    if len(label) <= width:
        return label
    return "…" + label[-(width - 1) :]
