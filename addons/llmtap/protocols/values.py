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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def load_json(body: bytes | None) -> Any:
    """Parsed JSON, or None for an empty or malformed body (never raises)."""
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None
