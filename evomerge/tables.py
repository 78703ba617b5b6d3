"""Tables as text: aligned plain text for the terminal, Markdown for reports and model cards."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    align: str | None = None,
    sep: str = "  ",
    min_widths: Sequence[int] | None = None,
) -> str:
    """Header, a rule of dashes under each column, rows; `align` has one letter per column, `l` or `r` (default:
    all left); a column is as wide as its widest cell (or `min_widths`); trailing spaces are stripped."""
    align = align or "l" * len(header)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    if min_widths:
        widths = [max(w, m) for w, m in zip(widths, min_widths)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(x).rjust(w) if a == "r" else str(x).ljust(w) for x, w, a in zip(cells, widths, align)]
        return sep.join(parts).rstrip()

    return "\n".join([line(header), sep.join("-" * w for w in widths), *(line(r) for r in rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> list[str]:
    """The lines of a Markdown table; `align` as in `text_table` (`r`: right-aligned column)."""
    align = align or "l" * len(header)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    return out + ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]


__all__ = ["markdown_table", "text_table"]
