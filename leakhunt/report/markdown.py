"""A Report as Markdown for a ticket or a pull request. Plots are written as PNG files beside the
Markdown (``<name>_plots/``) and linked relatively; without a place for them (stdout) the text
stands alone and each plot is named by its caption."""

from __future__ import annotations

from pathlib import Path

from leakhunt.report.blocks import Block, Callout, Code, Facts, Figure, Para, Report, Table
from leakhunt.text import markdown as md
from leakhunt.text import markdown_code, markdown_fence, printable

_TONE_MARK = {"bad": "🔴", "warn": "🟠", "good": "🟢", "info": "ℹ️"}


def _cell(text: str, code: bool) -> str:
    """Every text a report holds may come from the target: escaped, so that none of it is read
    as Markdown (or as the HTML Markdown allows)."""
    return markdown_code(text) if code else md(text)


def _table(t: Table) -> list[str]:
    align = t.alignment()
    lines = [
        "| " + " | ".join(md(h) for h in t.headers) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    lines += [
        "| " + " | ".join(_cell(c, i in t.code_columns) for i, c in enumerate(row)) + " |" for row in t.rows
    ]
    if t.caption:
        lines += ["", f"_{md(t.caption)}_"]
    return lines


def _block(b: Block, plots_dir: Path | None, link_base: str) -> list[str]:
    if isinstance(b, Para):
        return [md(b.text)]
    if isinstance(b, Callout):
        return [f"> {_TONE_MARK[b.tone]} **{md(b.title)}**" + (f" — {md(b.text)}" if b.text else "")]
    if isinstance(b, Facts):
        return [f"- **{md(k)}**: {md(v)}" for k, v in b.rows]
    if isinstance(b, Table):
        return _table(b)
    if isinstance(b, Figure):
        if plots_dir is None:
            return [f"_(plot: {md(b.caption)})_"]
        (plots_dir / f"{b.name}.png").write_bytes(b.png)
        return [f"![{b.name}]({link_base}/{b.name}.png)", "", f"_{md(b.caption)}_"]
    if isinstance(b, Code):
        fence = markdown_fence(b.text)
        return ([f"_{md(b.caption)}_", ""] if b.caption else []) + [fence, printable(b.text), fence]
    raise TypeError(f"no Markdown for {type(b).__name__}")


def render_markdown(report: Report, path: Path | None = None) -> str:
    """The Markdown text; with ``path``, the plots are written beside it and linked."""
    plots_dir = None
    link_base = ""
    if path is not None and report.figures():
        plots_dir = path.with_name(f"{path.stem}_plots")
        plots_dir.mkdir(parents=True, exist_ok=True)
        link_base = plots_dir.name
    h = report.headline
    lines = [
        f"# {md(h.title)}",
        "",
        f"_{md(h.subtitle)}_",
        "",
        f"**{_TONE_MARK[h.tone]} {md(h.badge)}** — {md(h.answer)}",
        "",
    ]
    lines += [" · ".join(f"**{md(k)}** {md(v)}" for k, v in h.numbers), ""]
    for s in report.sections:
        lines += [f"## {md(s.title)}", ""]
        for b in s.blocks:
            lines += _block(b, plots_dir, link_base) + [""]
    return "\n".join(lines).rstrip() + "\n"
