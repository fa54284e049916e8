"""The report as plain data: sections of tables, figures and notes.

Building the content (:mod:`.build`) and writing it out (:mod:`.render`:
HTML, Markdown) are separate, so both formats always show the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union


@dataclass
class Cell:
    """One table cell: the text shown, the raw value (kept in the HTML as ``data-value``
    so a test or a script reads the exact number) and a tone: ``good``, ``bad``, ``warn`` or ``""``."""

    text: str
    value: Any = None
    tone: str = ""


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    caption: str = ""
    name: str = ""


@dataclass
class Figure:
    name: str  # file stem for the Markdown report's PNG
    png: bytes
    caption: str
    alt: str = ""


@dataclass
class Note:
    text: str
    tone: str = ""  # "", "warn"


@dataclass
class Cards:
    """Headline numbers: a row of small cards (label, big value, sub-line, tone)."""

    items: list[tuple[str, str, str, str]]


@dataclass
class Details:
    """A collapsed block of preformatted text (configs)."""

    summary: str
    text: str


Block = Union[Table, Figure, Note, Cards, Details]


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list[Block] = field(default_factory=list)
    subtitle: str = ""
    level: int = 2


@dataclass
class Report:
    title: str
    subtitle: str
    sections: list[Section]
    meta: dict = field(default_factory=dict)


def pct(v: float | None, digits: int = 1) -> str:
    """0.9753 -> '97.5%'; None -> '—'."""
    return "—" if v is None else f"{100 * v:.{digits}f}%"


def num(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def asr_tone(v: float | None) -> str:
    if v is None:
        return ""
    return "good" if v <= 0.05 else "warn" if v <= 0.2 else "bad"
