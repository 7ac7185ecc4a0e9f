"""How figures are shown in tables and summaries; None (a figure that could not be computed) reads n/a."""

from __future__ import annotations


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def percent(value: float | None) -> str:
    """A fraction as a percentage with two decimals: 0.1234 -> '12.34'."""
    return "n/a" if value is None else f"{100 * value:.2f}"


def number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
