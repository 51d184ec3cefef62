"""Captured content (only ever on opt-in): messages as ``{"role", "content"}``, capped per direction."""

from __future__ import annotations

from typing import Any


def cap_messages(messages: list[dict[str, Any]], budget: int) -> tuple[dict[str, Any], ...]:
    """Keep content in order until ``budget`` characters are used; mark each message cut.

    One budget per direction (prompt, completion) of an exchange, so a record's captured
    text is bounded however many messages it has.
    """
    capped = []
    for message in messages:
        content = message["content"]
        if len(content) > budget:
            message = {**message, "content": content[:budget], "truncated": True}
        budget -= len(message["content"])
        capped.append(message)
    return tuple(capped)


def message(role: str, content: str, finish_reason: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": role, "content": content}
    if finish_reason:
        message["finish_reason"] = finish_reason
    return message


def text_of(content: Any) -> str:
    """Message content is a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""
