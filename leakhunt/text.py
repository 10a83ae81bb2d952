"""Text from outside (a target's command line, mapped paths, library and symbol names, container
names, files it wrote) is data: one place makes it safe for each place leakhunt shows it.

A process chooses its own command line and the names of what it maps; printed raw into root's
terminal, ``\\x1b]0;...\\a`` retitles the window and ``\\x1b[31m`` recolours what follows, and
``[red]`` is rich markup. The terminal (leakhunt.ui's consoles, which also take no markup at all),
Markdown and HTML each get the text through the function below for them; JSON carries it as is
(JSON escapes control characters itself).
"""

from __future__ import annotations

import html
import re

# C0 controls but tab and newline, DEL, C1 controls: shown as \xNN. Lone surrogates (bytes that
# were not UTF-8, decoded with surrogateescape) as \xNN of the byte they stand for.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
# What Markdown (CommonMark, GitHub's tables) reads as syntax in running text: emphasis, code,
# links and images (no [ ] means no link), HTML, table cells, headings, strikethrough.
_MARKDOWN = re.compile(r"([\\`*_\[\]<>|#~])")
_BACKTICKS = re.compile("`+")


def _visible(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: object) -> str:
    """For a terminal: every control character visible as an escape, nothing interpreted."""
    return _CONTROL.sub(_visible, str(text))


def one_line(text: object) -> str:
    """printable(), and newlines and tabs shown too: for a table cell or an error line."""
    return printable(text).replace("\n", "\\n").replace("\t", "\\t")


def markdown(text: object) -> str:
    """For Markdown prose and table cells: nothing in it is read as formatting or markup."""
    return _MARKDOWN.sub(r"\\\1", one_line(text))


def markdown_code(text: object) -> str:
    """Inline code: fenced with more backticks than any run inside it."""
    body = one_line(text)
    fence = "`" * (max((len(m) for m in _BACKTICKS.findall(body)), default=0) + 1)
    pad = " " if body.startswith("`") or body.endswith("`") else ""
    return f"{fence}{pad}{body}{pad}{fence}" if body else ""


def markdown_fence(text: object) -> str:
    """A fence for a code block that no line of ``text`` can close early."""
    longest = max((len(m) for m in _BACKTICKS.findall(str(text))), default=0)
    return "`" * max(3, longest + 1)


def html_text(text: object) -> str:
    """For HTML text and attribute values."""
    return html.escape(printable(text))


def short_command(cmdline: str) -> str:
    """'/opt/venv/bin/python3 -m engine 6' -> 'python3 -m engine 6': the program's name, not its path."""
    program, _, rest = cmdline.partition(" ")
    return f"{program.rsplit('/', 1)[-1]} {rest}".strip()
