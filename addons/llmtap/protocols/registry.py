"""The families and overlays llmtap reads, and the one finishing step they share.

A new family is one module with a ``FAMILY`` and one line in ``FAMILIES``; a router's extras
are one module with an ``OVERLAY`` and one line in ``OVERLAYS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmtap.protocols import (
    anthropic_messages,
    azure_openai,
    chat_completions,
    embeddings,
    gemini,
    openai_responses,
    openrouter,
    pulze,
)
from llmtap.protocols.base import Family, Overlay
from llmtap.protocols.providers import provider_from

#: Tried in order: the first family whose ``operation`` answers reads the exchange (Azure's
#: paths before the OpenAI families that read the same shapes on any path).
FAMILIES: tuple[Family, ...] = (
    azure_openai.FAMILY,
    openai_responses.FAMILY,
    embeddings.FAMILY,
    chat_completions.FAMILY,
    anthropic_messages.FAMILY,
    gemini.FAMILY,
)

OVERLAYS: tuple[Overlay, ...] = (pulze.OVERLAY, openrouter.OVERLAY)

#: A user's ``family_map``: (host, or path prefix starting with "/", family) pairs.
FamilyMap = tuple[tuple[str, Family], ...]


def family_map(entries: tuple[str, ...]) -> FamilyMap:
    """Parse ``HOST=FAMILY`` / ``/PREFIX=FAMILY`` entries; ValueError names an unknown family."""
    by_name = {family.name: family for family in FAMILIES}
    found = []
    for entry in entries:
        key, _, name = entry.partition("=")
        family = by_name.get(name.strip())
        if family is None:
            raise ValueError(f"family_map: {name.strip()!r} is not one of {', '.join(sorted(by_name))}")
        found.append((key.strip().lower() if not key.strip().startswith("/") else key.strip(), family))
    return tuple(found)


def find(method: str, path: str, host: str | None, mapping: FamilyMap = ()) -> tuple[Family, str] | None:
    """The family that reads this request and its operation; None to pass it through.

    A mapped host or path prefix is read by its family alone: if that family does not know
    the request, it passes through.
    """
    if mapping:
        for key, family in mapping:
            if key == host if key[0] != "/" else path.startswith(key):
                operation = family.operation(method, path, host)
                return None if operation is None else (family, operation)
    for family in FAMILIES:
        operation = family.operation(method, path, host)
        if operation is not None:
            return family, operation
    return None


def request_header_fields(headers: Mapping[str, str]) -> dict[str, Any]:
    """Fields every overlay reads from request headers (Pulze-Labels, …)."""
    fields: dict[str, Any] = {}
    for overlay in OVERLAYS:
        fields.update(overlay.request_fields(headers))
    return fields


def finish(fields: dict[str, Any], family: Family, body: Any, keep_content: bool) -> None:
    """Overlays, then who routed and who served: the same step for every family's record.

    ``body`` is the response object the overlays read (a stream's ``overlay_body``), or None.
    """
    host = fields.get("upstream_host")
    router = None
    if isinstance(body, dict):
        for overlay in OVERLAYS:
            if (overlay.families is None or family.name in overlay.families) and overlay.applies(host, body):
                fields.update(overlay.response_fields(body, keep_content))
                router = router or overlay.router
    fields["router"] = router
    fields["provider"] = (
        (fields.get("served_provider") or "").lower()
        or provider_from(host, fields.get("served_namespace"), fields.get("response_model"))
        or router
        or family.provider
    )
