"""OpenAI Responses: ``POST …/responses``, streamed or not, and background mode's ``GET …/responses/{id}``.

The response object holds ``status`` and ``usage.{input_tokens, input_tokens_details.{cached_tokens,
cache_write_tokens}, output_tokens, output_tokens_details.reasoning_tokens, total_tokens}``:
``input_tokens`` already includes the cached reads and writes and ``output_tokens`` the reasoning,
as llmtap's record means them. A stream is typed SSE events, each data a JSON object with a
``type``: ``response.created`` (the envelope), ``response.output_text.delta`` (content), and one
terminal ``response.completed`` / ``response.incomplete`` / ``response.failed`` (the whole
response, usage included) or ``error``; there is no ``[DONE]``. Unknown event types are ignored.

Background mode (``background: true``): the ``POST`` answers ``queued`` without usage. Its record
says so (``response_status``, ``background``), and the capture side keeps the response id as
pending; ``poll_id`` tells it which ``GET`` polls that response. The first poll that returns a
terminal status is recorded — it carries the usage, so it is the billed record, joined to the
``POST`` by ``response_id`` — and clears the id; polls before it and after it pass through.
"""

from __future__ import annotations

from typing import Any

from llmtap.protocols.base import Family, SSEStreamParser
from llmtap.protocols.content import cap_messages, message, text_of
from llmtap.protocols.errors import redact
from llmtap.protocols.values import as_float, as_int, as_str, load_json

#: Statuses after which a response changes no more (and carries its usage).
TERMINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})
#: Statuses of a background response still being worked on.
PENDING = frozenset({"queued", "in_progress"})
#: Stream events whose delta is generated content (the first is the time to first token).
CONTENT_EVENTS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_summary_text.delta",
    }
)
_TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def operation_for(method: str, path: str) -> str | None:
    """``chat`` for ``POST …/responses`` and ``GET …/responses/{id}``, else None."""
    if method == "POST":
        return "chat" if path.endswith("/responses") else None
    if method == "GET":
        return "chat" if poll_id_of(method, path) else None
    return None


def poll_id_of(method: str, path: str) -> str | None:
    """The response id a ``GET …/responses/{id}`` retrieves, else None."""
    if method != "GET":
        return None
    head, _, last = path.rstrip("/").rpartition("/")
    return last if last and head.endswith("/responses") else None


def request_fields(body: Any, content_cap: int | None) -> dict[str, Any]:
    if not isinstance(body, dict):
        return {}
    tools = body.get("tools")
    tool_list = [t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []
    text = body.get("text")
    text_format = text.get("format") if isinstance(text, dict) else None
    conversation = body.get("conversation")
    fields: dict[str, Any] = {
        "request_model": as_str(body.get("model")),
        "max_tokens": as_int(body.get("max_output_tokens")),
        "temperature": as_float(body.get("temperature")),
        "top_p": as_float(body.get("top_p")),
        "tool_count": len(tool_list) if isinstance(tools, list) else None,
        "tool_types": tuple(t for tool in tool_list if (t := as_str(tool.get("type")))) or None,
        "tool_names": tuple(n for tool in tool_list if (n := as_str(tool.get("name")))) or None,
        "tool_choice": _tool_choice(body.get("tool_choice")),
        "response_format": as_str(text_format.get("type")) if isinstance(text_format, dict) else None,
        "previous_response_id": as_str(body.get("previous_response_id")),
        "conversation_id": as_str(conversation.get("id")) if isinstance(conversation, dict) else as_str(conversation),
        "background": True if body.get("background") is True else None,
        "stream": body.get("stream") is True,
    }
    if content_cap is not None:
        fields["input_messages"] = _input_messages(body, content_cap)
    return fields


def response_fields(body: Any, content_cap: int | None) -> dict[str, Any]:
    """Fields of a response object (a plain body, a poll, or a stream's terminal event)."""
    if not isinstance(body, dict):
        return {}
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    input_details = usage.get("input_tokens_details")
    output_details = usage.get("output_tokens_details")
    status = as_str(body.get("status"))
    incomplete = body.get("incomplete_details")
    reason = as_str(incomplete.get("reason")) if isinstance(incomplete, dict) else None
    fields: dict[str, Any] = {
        "response_id": as_str(body.get("id")),
        "response_object": as_str(body.get("object")),
        "response_status": status,
        "created_at": as_float(body.get("created_at")) or None,
        "response_model": as_str(body.get("model")),
        "input_tokens": as_int(usage.get("input_tokens")),
        "output_tokens": as_int(usage.get("output_tokens")),
        "total_tokens": as_int(usage.get("total_tokens")),
        "cached_input_tokens": as_int(input_details.get("cached_tokens")) if isinstance(input_details, dict) else None,
        "cache_write_input_tokens": as_int(input_details.get("cache_write_tokens"))
        if isinstance(input_details, dict)
        else None,
        "service_tier": as_str(body.get("service_tier")),
        "reasoning_tokens": as_int(output_details.get("reasoning_tokens"))
        if isinstance(output_details, dict)
        else None,
        "finish_reasons": (reason or status,) if reason or status in TERMINAL else None,
    }
    if body.get("background") is True:
        fields["background"] = True
    output = body.get("output")
    items = [i for i in output if isinstance(i, dict)] if isinstance(output, list) else []
    if isinstance(output, list):
        fields["choice_count"] = sum(1 for i in items if i.get("type") == "message") or None
    if status == "failed":
        error = body.get("error")
        fields["error_type"] = "response_failed"
        fields["error_message"] = redact(as_str(error.get("message")) if isinstance(error, dict) else None)
    if content_cap is not None:
        texts = [text_of(i.get("content")) for i in items if i.get("type") == "message"]
        fields["output_messages"] = cap_messages(
            [message("assistant", t, reason or status) for t in texts], content_cap
        )
    return fields


class ResponsesStream(SSEStreamParser):
    """Reads typed events; done at the terminal event (or an ``error`` event)."""

    __slots__ = ("_cap", "content_chunks", "envelope", "error", "final", "problem", "texts")

    def __init__(self, content_cap: int | None) -> None:
        super().__init__()
        self.envelope: dict[str, Any] = {}
        self.final: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.content_chunks = 0
        self.texts: list[str] | None = [] if content_cap is not None else None
        self.problem: str | None = None
        self._cap = content_cap

    def event(self, data: bytes) -> bool:
        event = load_json(data)
        if not isinstance(event, dict):
            if data.strip() and data.strip() != b"[DONE]":
                self.problem = "stream event is not a JSON object"
            return False
        kind = event.get("type")
        if not isinstance(kind, str):  # a wrong type is no known event: ignored
            return False
        if kind in CONTENT_EVENTS:
            self.content_chunks += 1
            delta = event.get("delta")
            if self.texts is not None and kind == "response.output_text.delta" and isinstance(delta, str):
                self.texts.append(delta)
            return True
        response = event.get("response")
        if kind in _TERMINAL_EVENTS:
            if isinstance(response, dict):
                self.final = response
            else:
                self.problem = f"{kind} without a response object"
            self.done = True
        elif kind == "error":
            self.error = event
            self.done = True
        elif isinstance(response, dict) and kind in ("response.created", "response.in_progress", "response.queued"):
            self.envelope = response
        return False

    def fields(self) -> dict[str, Any]:
        fields = response_fields(self.final if self.final is not None else self.envelope, None)
        if self.final is None:
            fields["finish_reasons"] = None
            if self.error is None and self.problem is None:
                self.problem = "stream ended before its terminal event"
        fields["chunk_count"] = self.content_chunks
        if self.error is not None:
            fields["error_type"] = "stream_error"
            fields["error_message"] = redact(as_str(self.error.get("message")))
        if self.texts is not None:
            status = as_str((self.final or {}).get("status"))
            fields["output_messages"] = cap_messages([message("assistant", "".join(self.texts), status)], self._cap)
        return fields

    def overlay_body(self) -> dict[str, Any]:
        return self.final or self.envelope


class OpenAIResponses(Family):
    """``POST …/responses`` (plain, streamed, background) and the ``GET`` that polls a background one."""

    name = "openai_responses"

    def operation(self, method: str, path: str, host: str | None) -> str | None:
        return operation_for(method, path)

    def poll_id(self, method: str, path: str) -> str | None:
        return poll_id_of(method, path)

    def request_fields(
        self, body: Any, operation: str, path: str, query: str, content_cap: int | None
    ) -> dict[str, Any]:
        return request_fields(body, content_cap)

    def response_fields(self, body: Any, content_cap: int | None) -> dict[str, Any]:
        return response_fields(body, content_cap)

    def stream_parser(self, content_cap: int | None, content_type: str) -> ResponsesStream:
        return ResponsesStream(content_cap)


FAMILY = OpenAIResponses()


def _tool_choice(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        name = as_str(value.get("name"))
        return f"function:{name}" if name else as_str(value.get("type"))
    return None


def _input_messages(body: dict[str, Any], cap: int) -> tuple[dict[str, Any], ...]:
    found = []
    if instructions := as_str(body.get("instructions")):
        found.append(message("system", instructions))
    value = body.get("input")
    if isinstance(value, str):
        found.append(message("user", value))
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and "content" in item:
                found.append(message(as_str(item.get("role")) or "user", text_of(item.get("content"))))
    return cap_messages(found, cap)
