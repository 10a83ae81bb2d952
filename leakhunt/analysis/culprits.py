"""Known culprits, loaded from culprits.toml (data, not code), and matching a candidate against them."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cache
from importlib import resources

from leakhunt.proc.classes import RegionClass
from leakhunt.trace.events import Frame


@dataclass(frozen=True)
class KnownCulprit:
    id: str
    name: str
    explanation: str
    remedies: tuple[str, ...]
    references: tuple[str, ...]
    classes: frozenset[RegionClass]
    module: tuple[str, ...] = ()
    symbol: tuple[str, ...] = ()
    shm: tuple[str, ...] = ()
    frames: bool = False

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "explanation": self.explanation,
            "remedies": list(self.remedies),
            "references": list(self.references),
        }

    @classmethod
    def from_json(cls, doc: dict) -> KnownCulprit:
        """Read back what to_json() wrote (the matching rules are not recorded)."""
        return cls(
            id=str(doc.get("id", "")),
            name=str(doc.get("name", "")),
            explanation=str(doc.get("explanation", "")),
            remedies=tuple(str(r) for r in doc.get("remedies") or ()),
            references=tuple(str(r) for r in doc.get("references") or ()),
            classes=frozenset(),
        )


@cache
def known_culprits() -> tuple[KnownCulprit, ...]:
    data = tomllib.loads(resources.files("leakhunt.analysis").joinpath("culprits.toml").read_text())
    return tuple(
        KnownCulprit(
            c["id"],
            c["name"],
            " ".join(c["explanation"].split()),
            tuple(c.get("remedies", ())),
            tuple(c.get("references", ())),
            frozenset(RegionClass(x) for x in c.get("classes", ())),
            tuple(c.get("module", ())),
            tuple(c.get("symbol", ())),
            tuple(c.get("shm", ())),
            bool(c.get("frames", False)),
        )
        for c in data["culprit"]
    )


def _any(patterns: tuple[str, ...], value: str | None) -> bool:
    return bool(value) and any(fnmatchcase(value, p) for p in patterns)


def _basename(path: str | None) -> str | None:
    return path.rsplit("/", 1)[-1] if path else path


def match(
    klass: RegionClass | None = None,
    caller: Frame | None = None,
    stack: tuple[Frame, ...] = (),
    shm_name: str | None = None,
) -> KnownCulprit | None:
    """The first known culprit that fits what we know about a growing piece of memory."""
    for c in known_culprits():
        if klass is not None and c.classes and klass not in c.classes:
            continue
        frames = (caller,) if caller else ()
        if c.frames:
            frames += tuple(stack)
        for f in frames:
            if f is not None and (_any(c.module, _basename(f.module)) or _any(c.symbol, f.symbol)):
                return c
        if shm_name and _any(c.shm, _basename(shm_name)):
            return c
        if not (c.module or c.symbol or c.shm) and klass in c.classes:
            return c  # a class-only entry (GPU driver mappings)
    return None


def by_id(culprit_id: str) -> KnownCulprit | None:
    return next((c for c in known_culprits() if c.id == culprit_id), None)
