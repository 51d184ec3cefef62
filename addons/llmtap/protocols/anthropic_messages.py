"""Anthropic Messages: ``POST …/v1/messages``, streamed as typed SSE events, no ``[DONE]``.

Tokens are converted to llmtap's one meaning (``llmtap.record``): Anthropic's ``input_tokens``
excludes cache reads and writes, so ``input_tokens`` here is their sum; the cache reads are
``cached_input_tokens``, the writes ``cache_write_input_tokens`` (of which
``cache_write_1h_input_tokens`` were written for an hour, the rest for five minutes).

Stream events: ``message_start`` (the message, usage so far), ``content_block_delta`` (content),
``message_delta`` (final usage, ``stop_reason``), ``message_stop`` (the client has everything),
``ping``, and ``error`` inside a 200 stream. Unknown event types are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmtap.protocols.base import Family, SSEStreamParser
from llmtap.protocols.content import cap_messages, message, text_of
from llmtap.protocols.errors import redact
from llmtap.protocols.values import add_counts, as_count, as_float, as_int, as_str, load_json

#: The record's ``error_type`` for an ``error`` event inside a 200 stream.
STREAM_ERROR = "stream_error"


class AnthropicMessages(Family):
    name = "anthropic_messages"
    provider = "anthropic"

    def operation(self, method: str, path: str, host: str | None) -> str | None:
        # …/v1/messages/count_tokens and …/v1/messages/batches are not billed exchanges
        return "chat" if method == "POST" and path.endswith("/v1/messages") else None

    def request_fields(
        self, body: Any, operation: str, path: str, query: str, content_cap: int | None
    ) -> dict[str, Any]:
        if not isinstance(body, dict):
            return {}
        tools = body.get("tools")
        tool_list = [t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []
        stop = body.get("stop_sequences")
        fields = {
            "request_model": as_str(body.get("model")),
            "max_tokens": as_int(body.get("max_tokens")),
            "temperature": as_float(body.get("temperature")),
            "top_p": as_float(body.get("top_p")),
            "stop": tuple(s for s in stop if isinstance(s, str)) or None if isinstance(stop, list) else None,
            "tool_count": len(tool_list) if isinstance(tools, list) else None,
            "tool_names": tuple(n for t in tool_list if (n := as_str(t.get("name")))) or None,
            "tool_choice": _tool_choice(body.get("tool_choice")),
            "service_tier": as_str(body.get("service_tier")),
            "stream": body.get("stream") is True,
        }
        if content_cap is not None:
            fields["input_messages"] = _input_messages(body, content_cap)
        return fields

    def header_fields(self, headers: Mapping[str, str]) -> dict[str, Any]:
        return {"api_version": headers.get("anthropic-version")}

    def response_fields(self, body: Any, content_cap: int | None) -> dict[str, Any]:
        if not isinstance(body, dict):
            return {}
        fields = _message_fields(body)
        fields.update(usage_fields(body.get("usage")))
        reason = as_str(body.get("stop_reason"))
        fields["finish_reasons"] = (reason,) if reason else None
        fields["choice_count"] = 1
        if content_cap is not None:
            fields["output_messages"] = cap_messages([message("assistant", _content_text(body), reason)], content_cap)
        return fields

    def stream_parser(self, content_cap: int | None, content_type: str) -> MessageStream:
        return MessageStream(content_cap)


FAMILY = AnthropicMessages()


class MessageStream(SSEStreamParser):
    """Fields from the typed events of a streamed message."""

    __slots__ = ("_cap", "_message", "_texts", "_usage", "chunks", "error", "stop_reason")

    def __init__(self, content_cap: int | None) -> None:
        super().__init__()
        self._cap = content_cap
        self._message: dict[str, Any] = {}
        self._usage: dict[str, Any] = {}
        self._texts: list[str] | None = [] if content_cap is not None else None
        self.chunks = 0
        self.stop_reason: str | None = None
        self.error: dict[str, Any] | None = None

    def event(self, data: bytes) -> bool:
        event = load_json(data)
        if not isinstance(event, dict):
            return False
        kind = event.get("type")
        if kind == "content_block_delta":
            self.chunks += 1
            delta = event.get("delta")
            if self._texts is not None and isinstance(delta, dict):
                text = as_str(delta.get("text"))
                if text:
                    self._texts.append(text)
            return True
        if kind == "message_start" and isinstance(event.get("message"), dict):
            self._message = event["message"]
            self._merge_usage(self._message.get("usage"))
        elif kind == "message_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and as_str(delta.get("stop_reason")):
                self.stop_reason = delta["stop_reason"]
            self._merge_usage(event.get("usage"))
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            error = event.get("error")
            self.error = error if isinstance(error, dict) else {}
            self.done = True
        return False

    def _merge_usage(self, usage: Any) -> None:
        """``message_delta`` usage is cumulative: a later count replaces an earlier one."""
        if isinstance(usage, dict):
            self._usage.update((k, v) for k, v in usage.items() if v is not None)

    def fields(self) -> dict[str, Any]:
        fields = _message_fields(self._message)
        fields.update(usage_fields(self._usage or None))
        fields["finish_reasons"] = (self.stop_reason,) if self.stop_reason else None
        fields["chunk_count"] = self.chunks
        fields["choice_count"] = 1 if self._message else None
        if self.error is not None:
            fields["error_type"] = STREAM_ERROR
            kind, text = as_str(self.error.get("type")), as_str(self.error.get("message"))
            fields["error_message"] = redact(": ".join(filter(None, (kind, text)))[:300] or None)
        if self._texts is not None:
            fields["output_messages"] = cap_messages(
                [message("assistant", "".join(self._texts), self.stop_reason)], self._cap
            )
        return fields


def usage_fields(usage: Any) -> dict[str, Any]:
    """Anthropic ``usage`` in llmtap's token meaning (input includes cache reads and writes)."""
    if not isinstance(usage, dict):
        return {}
    uncached = as_count(usage.get("input_tokens"))
    reads = as_count(usage.get("cache_read_input_tokens"))
    writes = as_count(usage.get("cache_creation_input_tokens"))
    split = usage.get("cache_creation")
    one_hour = as_count(split.get("ephemeral_1h_input_tokens")) if isinstance(split, dict) else None
    if writes is None and isinstance(split, dict):
        five_minutes = as_count(split.get("ephemeral_5m_input_tokens"))
        if five_minutes is not None or one_hour is not None:
            writes = add_counts(five_minutes, one_hour)
    output = as_count(usage.get("output_tokens"))
    total_input = None if uncached is None else add_counts(uncached, reads, writes)
    fields = {
        "input_tokens": total_input,
        "cached_input_tokens": reads,
        "cache_write_input_tokens": writes,
        "cache_write_1h_input_tokens": one_hour,
        "output_tokens": output,
        "total_tokens": None if total_input is None or output is None else add_counts(total_input, output),
    }
    if tier := as_str(usage.get("service_tier")):  # the tier that served; else the one requested stays
        fields["service_tier"] = tier
    return fields


def _message_fields(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "response_id": as_str(body.get("id")),
        "response_object": as_str(body.get("type")),
        "response_model": as_str(body.get("model")),
    }


def _content_text(body: dict[str, Any]) -> str:
    return text_of(body.get("content"))


def _tool_choice(value: Any) -> str | None:
    """``{"type": "auto" | "any" | "none"}`` or ``{"type": "tool", "name": …}``."""
    if not isinstance(value, dict):
        return None
    kind = as_str(value.get("type"))
    name = as_str(value.get("name"))
    return f"function:{name}" if kind == "tool" and name else kind


def _input_messages(body: dict[str, Any], cap: int) -> tuple[dict[str, Any], ...]:
    found = []
    system = body.get("system")
    if system is not None and (text := text_of(system)):
        found.append(message("system", text))
    messages = body.get("messages")
    for m in messages if isinstance(messages, list) else ():
        if isinstance(m, dict):
            found.append(message(as_str(m.get("role")) or "user", text_of(m.get("content"))))
    return cap_messages(found, cap)
