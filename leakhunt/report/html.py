"""A Report as one self-contained HTML file: plots inlined as base64 PNG, styles inline, no
script and no external asset, so it can be attached to a ticket or mailed and opens anywhere."""

from __future__ import annotations

import base64

from leakhunt.report.blocks import Block, Callout, Code, Facts, Figure, Headline, Para, Report, Section, Table
from leakhunt.text import html_text as escape

CSS = """
:root { --ink:#1f2933; --muted:#6b7785; --line:#e4e7eb; --bg:#f7f8fa; --bad:#c62828; --warn:#b26a00;
        --good:#2e7d32; --info:#1f5fa8; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1040px; margin: 0 auto; padding: 28px 28px 60px; }
header.headline { background:#fff; border:1px solid var(--line); border-radius:10px; padding:22px 26px;
                  border-top:6px solid var(--tone); }
h1 { font-size:24px; margin:0 0 2px; word-break:break-word; }
.sub { color:var(--muted); font-size:13px; }
.answer { display:flex; gap:14px; align-items:flex-start; margin:16px 0 6px; font-size:16px; }
.badge { flex:none; font-weight:700; letter-spacing:.04em; color:#fff; background:var(--tone);
         border-radius:5px; padding:3px 10px; font-size:14px; }
.numbers { display:flex; flex-wrap:wrap; gap:10px; margin-top:14px; }
.number { background:var(--bg); border-radius:8px; padding:8px 14px; min-width:130px; }
.number b { display:block; font-size:20px; }
.number span { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
nav { margin:14px 0 0; font-size:13px; color:var(--muted); }
nav a { color:var(--info); text-decoration:none; margin-right:14px; white-space:nowrap; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 26px; margin-top:18px; }
h2 { font-size:18px; margin:0 0 12px; }
figure { margin:10px 0 18px; }
figure img { width:100%; height:auto; display:block; }
figcaption, .caption { color:var(--muted); font-size:13px; margin-top:4px; }
table { border-collapse:collapse; width:100%; margin:8px 0 16px; font-size:13.5px; }
th { text-align:left; color:var(--muted); font-weight:600; border-bottom:2px solid var(--line); padding:5px 8px; }
td { border-bottom:1px solid var(--line); padding:5px 8px; vertical-align:top; }
td.r, th.r { text-align:right; font-variant-numeric: tabular-nums; white-space:nowrap; }
td code { font-size:12.5px; word-break:break-all; }
tr.leak td { color:var(--bad); font-weight:600; }
dl { display:grid; grid-template-columns: max-content 1fr; gap:4px 18px; margin:8px 0 14px; font-size:14px; }
dt { color:var(--muted); }
dd { margin:0; word-break:break-word; }
pre { background:#111827; color:#e5e7eb; padding:12px 14px; border-radius:8px; overflow-x:auto;
      font-size:12.5px; line-height:1.45; }
.callout { border-left:5px solid var(--tone); background:var(--bg); padding:10px 14px; border-radius:6px;
           margin:8px 0 14px; }
.callout b { display:block; }
.tone-bad { --tone: var(--bad); } .tone-warn { --tone: var(--warn); }
.tone-good { --tone: var(--good); } .tone-info { --tone: var(--info); }
footer { color:var(--muted); font-size:12px; margin-top:24px; text-align:center; }
"""


def _headline(h: Headline, sections: tuple[Section, ...]) -> str:
    numbers = "".join(
        f'<div class="number"><b>{escape(v)}</b><span>{escape(k)}</span></div>' for k, v in h.numbers
    )
    nav = " ".join(f'<a href="#{s.anchor}">{escape(s.title)}</a>' for s in sections)
    return (
        f'<header class="headline tone-{h.tone}"><h1>{escape(h.title)}</h1>'
        f'<div class="sub">{escape(h.subtitle)}</div>'
        f'<div class="answer"><span class="badge">{escape(h.badge)}</span><div>{escape(h.answer)}</div></div>'
        f'<div class="numbers">{numbers}</div><nav>{nav}</nav></header>'
    )


def _table(t: Table) -> str:
    align = t.alignment()
    head = "".join(
        f'<th class="{"r" if align[i] == "r" else ""}">{escape(h)}</th>' for i, h in enumerate(t.headers)
    )
    rows = []
    for row in t.rows:
        cells = []
        for i, cell in enumerate(row):
            text = f"<code>{escape(cell)}</code>" if i in t.code_columns and cell else escape(cell)
            cells.append(f'<td class="{"r" if align[i] == "r" else ""}">{text}</td>')
        leak = ' class="leak"' if row and row[-1] == "leak" else ""
        rows.append(f"<tr{leak}>{''.join(cells)}</tr>")
    caption = f'<div class="caption">{escape(t.caption)}</div>' if t.caption else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{caption}"


def _block(b: Block) -> str:
    if isinstance(b, Para):
        return f"<p>{escape(b.text)}</p>"
    if isinstance(b, Callout):
        text = f"<div>{escape(b.text)}</div>" if b.text else ""
        return f'<div class="callout tone-{b.tone}"><b>{escape(b.title)}</b>{text}</div>'
    if isinstance(b, Facts):
        return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in b.rows) + "</dl>"
    if isinstance(b, Table):
        return _table(b)
    if isinstance(b, Figure):
        data = base64.b64encode(b.png).decode()
        return (
            f'<figure><img alt="{escape(b.caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(b.caption)}</figcaption></figure>"
        )
    if isinstance(b, Code):
        caption = f'<div class="caption">{escape(b.caption)}</div>' if b.caption else ""
        return f"{caption}<pre>{escape(b.text)}</pre>"
    raise TypeError(f"no HTML for {type(b).__name__}")


def render_html(report: Report) -> str:
    body = "".join(
        f'<section id="{s.anchor}"><h2>{escape(s.title)}</h2>{"".join(_block(b) for b in s.blocks)}</section>'
        for s in report.sections
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(report.headline.title)}</title><style>{CSS}</style></head>"
        f"<body><main>{_headline(report.headline, report.sections)}{body}"
        f"<footer>leakhunt report · {escape(report.headline.subtitle)}</footer></main></body></html>\n"
    )
