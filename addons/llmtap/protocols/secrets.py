"""An exchange's own credentials, and their removal from everything llmtap stores.

Generic patterns (``Bearer …``, ``sk-…``, see ``errors.redact``) miss keys that do not
look like keys: an upstream that answers ``401 Incorrect API key provided: <key>`` echoes
whatever the app sent. The proxy holds the exact key from the request, so every string of the
record (error texts, path, labels, metadata, captured content) has that exact value replaced
by ``[redacted]`` before the record reaches any sink.

Which values count as the exchange's credentials: the ``Authorization`` header (the token of
``Bearer``/``Token``/``Basic``, else the whole value), ``api-key``, ``x-api-key`` and
``x-goog-api-key``, and the query-string parameters ``key``, ``api_key``, ``api-key`` and
``access_token`` (as sent, and URL-decoded). Values shorter than ``MIN_SECRET_CHARS`` are not
treated as secrets: a placeholder key such as ``ollama`` or ``none`` must not mangle model
names and texts that happen to contain it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from json.encoder import c_encode_basestring
from typing import Any
from urllib.parse import parse_qsl

from llmtap.record import FIELD_NAMES, ExchangeRecord

MIN_SECRET_CHARS = 12
REPLACEMENT = "[redacted]"
AUTH_HEADERS = ("authorization", "proxy-authorization", "api-key", "x-api-key", "x-goog-api-key")
QUERY_KEYS = frozenset({"key", "api_key", "api-key", "apikey", "access_token"})
_SCHEMES = ("bearer", "token", "basic")


def credentials(headers: Mapping[str, str], target: str = "") -> tuple[str, ...]:
    """The exchange's secrets, longest first (so that a key's prefix never hides its rest)."""
    found: set[str] = set()
    for name in AUTH_HEADERS:
        value = headers.get(name)
        if not value:
            continue
        for part in value.split(","):  # repeated headers arrive joined
            part = part.strip()
            scheme, _, token = part.partition(" ")
            token = token.strip()
            if scheme.lower() in _SCHEMES and token:
                found.add(token)
                if scheme.lower() == "basic":
                    found.update(_basic_parts(token))
            else:
                found.add(part)
    query = target.partition("?")[2]
    if query:
        for pair in query.split("&"):
            name, _, raw = pair.partition("=")
            if name.lower() in QUERY_KEYS and raw:
                found.add(raw)
        for name, value in parse_qsl(query, keep_blank_values=False):
            if name.lower() in QUERY_KEYS:
                found.add(value)
    return tuple(sorted((s for s in found if len(s) >= MIN_SECRET_CHARS), key=len, reverse=True))


def _basic_parts(token: str) -> Iterable[str]:
    try:
        user, _, password = base64.b64decode(token, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return ()
    return (user, password)


def scrub_text(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REPLACEMENT)
    return text


def scrub_value(value: Any, secrets: tuple[str, ...]) -> Any:
    """``value`` with every secret removed from every string in it (keys of mappings too)."""
    if isinstance(value, str):
        return scrub_text(value, secrets)
    if isinstance(value, Mapping):
        return {scrub_text(str(k), secrets): scrub_value(v, secrets) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(scrub_value(v, secrets) for v in value)
    if isinstance(value, list):
        return [scrub_value(v, secrets) for v in value]
    return value


def _forms(secret: str) -> tuple[str, str]:
    return secret, c_encode_basestring(secret)[1:-1]  # as written inside a JSON string


def scrub_record(record: ExchangeRecord, secrets: tuple[str, ...] | None) -> ExchangeRecord:
    """``record`` without the exchange's secrets anywhere in it.

    The record's canonical JSON (made once anyway: every sink writes it) is searched first; only
    a record that holds a secret is rebuilt, field by field.
    """
    if not secrets:
        return record
    line = record.to_json()
    if not any(form in line for secret in secrets for form in _forms(secret)):
        return record
    changes = {}
    for name in FIELD_NAMES:
        value = getattr(record, name)
        if value is None or isinstance(value, (bool, int, float)):
            continue
        cleaned = scrub_value(value, secrets)
        if cleaned != value:
            changes[name] = cleaned
    return record.replace(**changes) if changes else record
