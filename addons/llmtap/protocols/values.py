"""Defensive coercions for JSON values from untrusted bodies: wrong types become None."""

from __future__ import annotations

import json
import math
from typing import Any


def as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def as_float(value: Any) -> float | None:
    """A finite float, or None: NaN, infinities and integers beyond a float's range (``10**400``,
    which ``float()`` refuses with OverflowError) are not numbers llmtap can use."""
    if type(value) is float:  # the common case, first
        return value if math.isfinite(value) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def as_number(value: Any) -> int | float | None:
    """An amount as sent (USD): any int or float, non-finite and huge ones included, so that
    ``llmtap.pricing.validity`` can note what was wrong with it; anything else is None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def as_count(value: Any) -> int | float | None:
    """A token count as sent: an int (an integral float becomes one), or a non-finite float
    kept as is for ``llmtap.pricing.validity`` to note; anything else is None."""
    if isinstance(value, float) and not math.isfinite(value):
        return value
    return as_int(value)


def add_counts(*parts: int | float | None) -> int | float | None:
    """The sum of token counts (None parts count 0), except that a negative or non-finite part is
    returned itself: a sum must not hide it from ``llmtap.pricing.validity``."""
    for part in parts:
        if part is not None and (part < 0 or (isinstance(part, float) and not math.isfinite(part))):
            return part
    return sum(part for part in parts if part is not None)


def as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


_DECODER = json.JSONDecoder()


def load_json(body: bytes | None) -> Any:
    """Parsed JSON, or None for an empty or malformed body (never raises).

    Bodies and stream events are almost always one object, ``{`` to ``}``: such a body is UTF-8
    (as json.loads would detect, unless a NUL follows for UTF-16/32) and ``raw_decode`` parses
    it without json.loads's layers, which cost as much as the parsing of a stream event. Any
    other shape takes json.loads, for its exact rules.
    """
    if not body:
        return None
    try:
        if body[:1] == b"{" and body[1:2] != b"\0":
            text = body.decode("utf-8", "surrogatepass")
            value, end = _DECODER.raw_decode(text)
            if end == len(text):
                return value
        return json.loads(body)
    except (ValueError, RecursionError):
        return None
