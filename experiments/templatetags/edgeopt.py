"""Number formats for the pages: units that fit the size of the number, a dash (never
"0 bytes") for what was not measured, errors without the exception's class name."""
from __future__ import annotations

import re

from django import template

register = template.Library()
DASH = "—"
EXCEPTION_PREFIX = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Exit|Stopped|Applicable)): ")


def _significant(value: float, digits: int = 3) -> str:
    """3 significant digits, trailing zeros kept (45.0, 3.20), no exponent (12,300)."""
    text = f"{value:#.{digits}g}"
    return f"{float(text):,.0f}" if "e" in text else text.rstrip(".")


@register.filter
def duration_ms(value) -> str:
    """0.045 -> "45.0 µs", 3.2 -> "3.20 ms", 1520 -> "1.52 s"; three significant digits."""
    if value in (None, ""):  # "" is what a template gives for a missing value
        return DASH
    value = float(value)
    if value < 1:
        return f"{_significant(value * 1000)} µs"
    if value < 1000:
        return f"{_significant(value)} ms"
    return f"{_significant(value / 1000)} s"


@register.filter
def size_bytes(value) -> str:
    """Binary units, as the size constraints count them (MB = 2^20 bytes)."""
    return _scaled(value, (("MB", 2**20), ("KB", 2**10)), "{:.0f} bytes")


@register.filter
def count(value) -> str:
    """12345678 -> "12.3 M"."""
    return _scaled(value, (("G", 1e9), ("M", 1e6), ("k", 1e3)), "{:.0f}")


def _scaled(value, units, below_smallest: str) -> str:
    """The largest unit the value reaches, three significant digits; below_smallest otherwise."""
    if value in (None, ""):  # "" is what a template gives for a missing value
        return DASH
    value = float(value)
    for unit, scale in units:
        if value >= scale:
            return f"{_significant(value / scale)} {unit}"
    return below_smallest.format(value)


@register.filter
def percent(value, digits: int = 2) -> str:
    """0.9861 -> "98.61%"."""
    if value in (None, ""):  # "" is what a template gives for a missing value
        return DASH
    return f"{float(value) * 100:.{int(digits)}f}%"


@register.filter
def times(value) -> str:
    """A ratio: 3.62 -> "3.62×"."""
    if value in (None, ""):  # "" is what a template gives for a missing value
        return DASH
    return f"{float(value):.2f}×"


@register.filter
def plain_error(value) -> str:
    """"ValueError: the model expects ..." -> "the model expects ..." (the class name says
    nothing to a user; the message does)."""
    return EXCEPTION_PREFIX.sub("", str(value or "")).strip()


@register.filter
def get(mapping, key):
    return (mapping or {}).get(key) if hasattr(mapping, "get") else None


@register.filter
def metric(value) -> str:
    """A progress metric: whole numbers as they are, others to four significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else _significant(value, 4)
