"""The vocabulary a report is written in: sections made of plain blocks (text, facts, tables,
figures, code, callouts). Section functions build these; the HTML and Markdown renderers draw
them, so a new section never touches a renderer and a new format never touches a section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Tone = Literal["info", "good", "warn", "bad"]


def sentence(text: str) -> str:
    """A library's lower-case reason ("growing ...") as a sentence of a report."""
    text = text.strip()
    return (text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")) if text else text


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Callout:
    """A boxed sentence that must not be missed: a leak, an incomplete recording, missing data."""

    tone: Tone
    title: str
    text: str = ""


@dataclass(frozen=True)
class Facts:
    """Label/value pairs shown as a compact grid (the key numbers, the environment)."""

    rows: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    align: str = ""  # one letter per column: l or r (default: first l, the rest r)
    code_columns: tuple[int, ...] = ()  # columns shown as code (paths, stacks)
    caption: str = ""

    def alignment(self) -> str:
        return self.align or ("l" + "r" * (len(self.headers) - 1))


@dataclass(frozen=True)
class Figure:
    """A rendered plot: PNG bytes and a caption that says what to look at."""

    name: str  # file-name friendly, unique within a report
    png: bytes
    caption: str


@dataclass(frozen=True)
class Code:
    text: str
    caption: str = ""


Block = Para | Callout | Facts | Table | Figure | Code


@dataclass(frozen=True)
class Section:
    title: str
    anchor: str
    blocks: tuple[Block, ...] = field(default_factory=tuple)

    def figures(self) -> list[Figure]:
        return [b for b in self.blocks if isinstance(b, Figure)]


@dataclass(frozen=True)
class Headline:
    """The top of the report: what was looked at and the one-line answer."""

    title: str
    subtitle: str
    tone: Tone
    badge: str  # LEAK, PLATEAU, NO LEAK, INCONCLUSIVE
    answer: str  # the verdict sentence
    numbers: tuple[tuple[str, str], ...]  # big key figures: (label, value)


@dataclass(frozen=True)
class Report:
    headline: Headline
    sections: tuple[Section, ...]

    def figures(self) -> list[Figure]:
        return [f for s in self.sections for f in s.figures()]
