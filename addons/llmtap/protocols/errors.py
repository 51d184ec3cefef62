"""Upstream error bodies: a short, content-free description, credentials redacted."""

from __future__ import annotations

import re
from typing import Any

from llmtap.protocols.values import as_str

#: What looks like a credential inside an error text ("Incorrect API key provided: sk-…").
_SECRET = re.compile(r"(?i)\bbearer\s+\S+|\b(?:sk|pk|rk|key|api|pulze)[-_][\w*.-]{6,}")


def redact(text: str | None) -> str | None:
    return None if text is None else _SECRET.sub("[redacted]", text)


def error_message(body: Any, raw: bytes | None) -> str | None:
    """A short, content-free description of an upstream error body, credentials redacted.

    Only the provider's own message fields are taken: FastAPI/pydantic 422 bodies can echo
    the request (``input``), which must not leak into the record.
    """
    return redact(_error_text(body, raw))


def _error_text(body: Any, raw: bytes | None) -> str | None:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and as_str(error.get("message")):
            return error["message"][:300]
        if as_str(error):
            return error[:300]
        detail = body.get("detail")
        if isinstance(detail, list):
            msgs = [f"{_loc(d.get('loc'))}: {_short(d.get('msg'))}" for d in detail[:20] if isinstance(d, dict)]
            return "; ".join(msgs)[:300] or None
        if as_str(detail):
            return detail[:300]
        if as_str(body.get("message")):
            return body["message"][:300]
        return None
    if raw:
        text = raw[:2048].decode("utf-8", "replace")
        lower = text.lower()
        if "<title>" in lower:
            start = lower.index("<title>") + 7
            end = lower.find("</title>", start)
            return text[start : end if end > 0 else start + 120].strip()[:120] or None
        return text.strip().splitlines()[0][:120] if text.strip() else None
    return None


def _loc(loc: Any) -> str:
    """FastAPI's ``loc`` is a list of names and indexes; any other shape is shown, not trusted."""
    if isinstance(loc, list):
        return ".".join(_short(part) for part in loc[:10])
    return _short(loc)


def _short(value: Any) -> str:
    """A bounded text of any JSON value (``str`` of a huge int raises past 4300 digits)."""
    if isinstance(value, str):
        return value[:100]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)[:40] if not isinstance(value, int) or abs(value) < 10**40 else "<huge number>"
    return "" if value is None else type(value).__name__
