"""OpenAI-compatible Chat Completions and Completions (OpenAI, Pulze, and the many hosts that copy them).

Pure functions of parsed JSON to record fields, and a stream parser fed SSE events that ends
at ``data: [DONE]``. Router extras such as Pulze's ``metadata`` are overlays
(``llmtap.protocols.registry``): this module reads only the OpenAI shape.
"""

from __future__ import annotations

import json
from typing import Any

from llmtap.protocols.base import Family, SSEStreamParser
from llmtap.protocols.content import cap_messages, message, text_of
from llmtap.protocols.values import as_count, as_float, as_int, as_str, load_json


def operation_for(method: str, path: str) -> str | None:
    """``chat`` / ``text_completion`` for the completion endpoints, else None."""
    if method != "POST":
        return None
    path = path.split("?", 1)[0].rstrip("/")
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/completions"):
        return "text_completion"
    return None


def request_fields(body: Any, operation: str, content_cap: int | None) -> dict[str, Any]:
    """Request parameters. ``content_cap`` is None unless the user opted in to content capture."""
    if not isinstance(body, dict):
        return {}
    tools = body.get("tools")
    tool_list = tools if isinstance(tools, list) else []
    tool_names = tuple(
        name
        for tool in tool_list
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
        for name in [as_str(tool["function"].get("name"))]
        if name
    )
    response_format = body.get("response_format")
    stop = body.get("stop")
    fields = {
        "request_model": as_str(body.get("model")),
        "max_tokens": as_int(body.get("max_tokens", body.get("max_completion_tokens"))),
        "temperature": as_float(body.get("temperature")),
        "top_p": as_float(body.get("top_p")),
        "n": as_int(body.get("n")),
        "best_of": as_int(body.get("best_of")),
        "stop": (stop,)
        if isinstance(stop, str) and stop
        else tuple(s for s in stop if isinstance(s, str))
        if isinstance(stop, list)
        else None,
        "presence_penalty": as_float(body.get("presence_penalty")),
        "frequency_penalty": as_float(body.get("frequency_penalty")),
        "logprobs": as_int(body.get("logprobs")),
        "seed": as_int(body.get("seed")),
        "tool_count": len(tool_list) if isinstance(tools, list) else None,
        "tool_names": tool_names or None,
        "tool_choice": _tool_choice(body.get("tool_choice")),
        "response_format": as_str(response_format.get("type")) if isinstance(response_format, dict) else None,
        "logit_bias": bool(body["logit_bias"]) if "logit_bias" in body and body["logit_bias"] is not None else None,
        "stream": body.get("stream") is True,
    }
    if (tier := as_str(body.get("service_tier"))) is not None:  # OpenAI: flex, priority, auto, default
        fields["service_tier"] = tier
    if content_cap is not None:
        fields["input_messages"] = _input_messages(body, operation, content_cap)
    return fields


def response_fields(body: Any, content_cap: int | None) -> dict[str, Any]:
    """Fields of a complete (non-streamed) response body."""
    if not isinstance(body, dict):
        return {}
    choices = body.get("choices")
    choice_list = [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []
    fields = _envelope(body)
    fields["choice_count"] = len(choice_list) if isinstance(choices, list) else None
    reasons = tuple(r for c in choice_list if (r := as_str(c.get("finish_reason"))))
    fields["finish_reasons"] = reasons or None
    if content_cap is not None:
        fields["output_messages"] = cap_messages(
            [message("assistant", _choicetext_of(c), as_str(c.get("finish_reason"))) for c in choice_list], content_cap
        )
    return fields


class StreamAccumulator(SSEStreamParser):
    """Collects record fields from the JSON events of a streamed response, one at a time."""

    __slots__ = ("_cap", "choices_seen", "content_chunks", "envelope", "finish_reasons", "texts")

    def __init__(self, content_cap: int | None) -> None:
        super().__init__()
        self.envelope: dict[str, Any] = {}
        self.finish_reasons: dict[int, str] = {}
        self.choices_seen: set[int] = set()
        self.content_chunks = 0
        self.texts: dict[int, list[str]] | None = {} if content_cap is not None else None
        self._cap = content_cap

    def event(self, data: bytes) -> bool:
        if data == b"[DONE]":
            self.done = True
            return False
        return self.add(load_json(data))

    def add(self, event: Any) -> bool:
        """Take one parsed event; True when it carried generated content."""
        if not isinstance(event, dict):
            return False
        envelope = self.envelope
        for key in ("id", "object", "model", "created", "service_tier"):  # the first event that has one counts
            if key not in envelope and event.get(key) is not None:
                envelope[key] = event[key]
        for key in ("usage", "metadata"):  # the last event that has one counts
            if isinstance(event.get(key), dict):
                envelope[key] = event[key]
        carried = False
        choices = event.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            index = as_int(choice.get("index")) or 0
            self.choices_seen.add(index)
            if reason := as_str(choice.get("finish_reason")):
                self.finish_reasons[index] = reason
            text = _choicetext_of(choice)
            if text or _has_tool_calls(choice):
                carried = True
                if self.texts is not None and text:
                    self.texts.setdefault(index, []).append(text)
        if carried:
            self.content_chunks += 1
        return carried

    def overlay_body(self) -> dict[str, Any]:
        return self.envelope

    def fields(self) -> dict[str, Any]:
        fields = _envelope(self.envelope)
        fields["chunk_count"] = self.content_chunks
        fields["choice_count"] = len(self.choices_seen) if self.choices_seen else None
        reasons = tuple(self.finish_reasons[i] for i in sorted(self.finish_reasons))
        fields["finish_reasons"] = reasons or None
        if self.texts is not None:
            messages = [
                message("assistant", "".join(self.texts.get(i, ())), self.finish_reasons.get(i))
                for i in sorted(self.choices_seen)
            ]
            fields["output_messages"] = cap_messages(messages, self._cap)
        return fields


def _envelope(body: dict[str, Any]) -> dict[str, Any]:
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    fields = {
        "response_id": as_str(body.get("id")),
        "response_object": as_str(body.get("object")),
        "created_at": _created(body.get("created")),
        "response_model": as_str(body.get("model")),
        "input_tokens": as_count(usage.get("prompt_tokens")),
        "output_tokens": as_count(usage.get("completion_tokens")),
        "total_tokens": as_count(usage.get("total_tokens")),
        "cached_input_tokens": as_count(prompt_details.get("cached_tokens"))
        if isinstance(prompt_details, dict)
        else None,
        "reasoning_tokens": as_count(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict)
        else None,
    }
    if isinstance(prompt_details, dict) and "cache_write_tokens" in prompt_details:  # OpenAI, since 2026
        fields["cache_write_input_tokens"] = as_int(prompt_details["cache_write_tokens"])
    if (tier := as_str(body.get("service_tier"))) is not None:  # the tier that ran, over the one asked for
        fields["service_tier"] = tier
    return fields


_INCLUDE_USAGE = b'"stream_options":{"include_usage":true}'


def with_stream_usage(content: bytes | None) -> bytes | None:
    """``--inject-stream-usage``: a streaming chat request body with
    ``stream_options.include_usage`` added, or None when it needs no change (not a streaming
    request, or the app already decided, ``include_usage: false`` included).

    The key goes first into the object, the app's bytes after it unchanged; only a request with
    a ``stream_options`` object lacking the key is re-serialised.
    """
    body = load_json(content)
    if not isinstance(body, dict) or body.get("stream") is not True:
        return None
    options = body.get("stream_options")
    if "stream_options" not in body:
        start = len(content) - len(content.lstrip())
        if content[start : start + 1] == b"{" and content[start + 1 : start + 2] != b"\0":  # UTF-8
            start += 1
            comma = b"" if content[start:].lstrip().startswith(b"}") else b","
            return content[:start] + _INCLUDE_USAGE + comma + content[start:]
        body["stream_options"] = {"include_usage": True}
    elif isinstance(options, dict) and "include_usage" not in options:
        body["stream_options"] = {**options, "include_usage": True}
    else:
        return None
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


class ChatCompletions(Family):
    """``POST …/chat/completions`` and ``POST …/completions``, streamed or not."""

    name = "chat_completions"

    def operation(self, method: str, path: str, host: str | None) -> str | None:
        return operation_for(method, path)

    def request_fields(
        self, body: Any, operation: str, path: str, query: str, content_cap: int | None
    ) -> dict[str, Any]:
        return request_fields(body, operation, content_cap)

    def response_fields(self, body: Any, content_cap: int | None) -> dict[str, Any]:
        return response_fields(body, content_cap)

    def stream_parser(self, content_cap: int | None, content_type: str) -> StreamAccumulator:
        return StreamAccumulator(content_cap)


FAMILY = ChatCompletions()


def _created(value: Any) -> float | None:
    """Pulze sends milliseconds, OpenAI seconds; no real second count reaches 1e11 (year 5138)."""
    number = as_float(value)
    if not number:
        return None
    return number / 1000.0 if number > 1e11 else number


def _tool_choice(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        function = value.get("function")
        name = as_str(function.get("name")) if isinstance(function, dict) else None
        return f"function:{name}" if name else as_str(value.get("type"))
    return None


def _choicetext_of(choice: dict[str, Any]) -> str:
    """Generated text of a choice, message or stream delta alike."""
    for key in ("delta", "message"):
        part = choice.get(key)
        if isinstance(part, dict):
            return text_of(part.get("content")) or text_of(part.get("refusal"))
    return text_of(choice.get("text"))


def _has_tool_calls(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta")
    return isinstance(delta, dict) and bool(delta.get("tool_calls") or delta.get("function_call"))


def _input_messages(body: dict[str, Any], operation: str, cap: int) -> tuple[dict[str, Any], ...]:
    if operation == "chat":
        messages = body.get("messages")
        found = [
            message(as_str(m.get("role")) or "user", text_of(m.get("content")))
            for m in (messages if isinstance(messages, list) else ())
            if isinstance(m, dict)
        ]
    else:
        prompt = body.get("prompt")
        prompts = (
            [prompt]
            if isinstance(prompt, str)
            else [p for p in prompt if isinstance(p, str)]
            if isinstance(prompt, list)
            else []
        )
        found = [message("user", p) for p in prompts]
    return cap_messages(found, cap)
