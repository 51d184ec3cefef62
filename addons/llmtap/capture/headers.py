"""Reading a flow's headers: one plain map, the key's fingerprint, the trace context, the error type.

The API key goes no further than ``key_fingerprint``: it is reduced to a keyed hash prefix
before anything reaches a record.
"""

from __future__ import annotations

import hmac
from typing import Any

from mitmproxy import http

_PUBLIC_SALT = b"llmtap-key-fingerprint-v1"
#: The error llmtap gives an exchange still open when the proxy stops.
SHUTDOWN_MESSAGE = "llmtap stopped while the exchange was in flight"


def header_map(headers: http.Headers) -> dict[str, str]:
    """Headers as one plain dict with lower-case names, repeated headers joined as mitmproxy does.

    Each ``Headers.get`` scans and re-decodes every header (~3 µs); one pass that keeps them
    all costs about as much as one such lookup, and both hooks need several.
    """
    found: dict[str, str] = {}
    for name, value in headers.fields:
        key = name.decode("utf-8", "surrogateescape").lower()
        text = value.decode("utf-8", "surrogateescape")
        found[key] = f"{found[key]}, {text}" if key in found else text
    return found


def api_key(headers: Any, query: str = "") -> str | None:
    """The API key as the app sent it: ``Authorization: Bearer``, ``api-key`` (Azure),
    ``x-api-key`` (Anthropic), ``x-goog-api-key`` or a ``key=`` query parameter (Gemini)."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    key = headers.get("api-key") or headers.get("x-api-key") or headers.get("x-goog-api-key")
    if key or "key=" not in query:
        return key or None
    return next((v for k, _, v in (p.partition("=") for p in query.split("&")) if k == "key" and v), None)


def key_fingerprint(headers: Any, salt: str, query: str = "") -> str | None:
    """A keyed hash prefix of the API key; the key itself goes no further than the record's making."""
    key = api_key(headers, query)
    if not key:
        return None
    return "fp_" + hmac.digest(salt.encode() if salt else _PUBLIC_SALT, key.encode(), "sha256")[:8].hex()


def error_type(flow: http.HTTPFlow) -> str | None:
    """A short, bounded name for what went wrong, or None for a complete 2xx/3xx exchange."""
    if flow.error is not None:
        message = flow.error.msg.lower()
        if flow.error.msg == flow.error.KILLED_MESSAGE:
            return "killed"
        if flow.error.msg == SHUTDOWN_MESSAGE:
            return "proxy_shutdown"
        if "client" in message:
            return "client_disconnected"
        if flow.response is None:
            return "connection_error"
        return "upstream_disconnected"
    if flow.response is not None and flow.response.status_code >= 400:
        return f"http_{flow.response.status_code}"
    return None


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a valid W3C ``traceparent`` (version-traceid-spanid-flags)."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or parts[1] == "0" * 32:
        return None
    try:
        int(parts[1], 16), int(parts[2], 16)
    except ValueError:
        return None
    return parts[1].lower()
