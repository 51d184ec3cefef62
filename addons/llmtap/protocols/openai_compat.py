"""OpenAI-compatible completions (Pulze, OpenAI, and the many hosts that copy them).

Pure functions of parsed JSON to record fields, and a stream accumulator fed SSE events.
Pulze's extras (``metadata``) are delegated to ``pulze.metadata_fields``.
"""

from __future__ import annotations

import re
from typing import Any

from llmtap.protocols import pulze
from llmtap.protocols.values import as_float, as_int, as_str

#: Hosts whose provider is known without looking at the body.
PROVIDER_BY_HOST = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "api.mistral.ai": "mistralai",
    "api.groq.com": "groq",
    "api.deepseek.com": "deepseek",
    "api.together.xyz": "together",
    "api.perplexity.ai": "perplexity",
    "api.x.ai": "xai",
    "api.cohere.ai": "cohere",
    "api.cohere.com": "cohere",
    "openrouter.ai": "openrouter",
}


def operation_for(method: str, path: str) -> str | None:
    """``chat`` / ``text_completion`` for the completion endpoints, else None (pass through)."""
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
    if content_cap is not None:
        fields["input_messages"] = _input_messages(body, operation, content_cap)
    return fields


def response_fields(body: Any, content_cap: int | None) -> dict[str, Any]:
    """Fields of a complete (non-streamed) response body."""
    if not isinstance(body, dict):
        return {}
    choices = body.get("choices")
    choice_list = [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []
    fields = _envelope(body, content_cap is not None)
    fields["choice_count"] = len(choice_list) if isinstance(choices, list) else None
    reasons = tuple(r for c in choice_list if (r := as_str(c.get("finish_reason"))))
    fields["finish_reasons"] = reasons or None
    if content_cap is not None:
        fields["output_messages"] = cap_messages(
            [_message("assistant", _choice_text(c), as_str(c.get("finish_reason"))) for c in choice_list], content_cap
        )
    return fields


class StreamAccumulator:
    """Collects record fields from the JSON events of a streamed response, one at a time."""

    __slots__ = ("_cap", "choices_seen", "content_chunks", "envelope", "finish_reasons", "texts")

    def __init__(self, content_cap: int | None) -> None:
        self.envelope: dict[str, Any] = {}
        self.finish_reasons: dict[int, str] = {}
        self.choices_seen: set[int] = set()
        self.content_chunks = 0
        self.texts: dict[int, list[str]] | None = {} if content_cap is not None else None
        self._cap = content_cap

    def add(self, event: Any) -> bool:
        """Take one parsed event; True when it carried generated content."""
        if not isinstance(event, dict):
            return False
        envelope = self.envelope
        for key in ("id", "object", "model", "created"):  # the first event that has one counts
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
            text = _choice_text(choice)
            if text or _has_tool_calls(choice):
                carried = True
                if self.texts is not None and text:
                    self.texts.setdefault(index, []).append(text)
        if carried:
            self.content_chunks += 1
        return carried

    def fields(self) -> dict[str, Any]:
        fields = _envelope(self.envelope, self._cap is not None)
        fields["chunk_count"] = self.content_chunks
        fields["choice_count"] = len(self.choices_seen) if self.choices_seen else None
        reasons = tuple(self.finish_reasons[i] for i in sorted(self.finish_reasons))
        fields["finish_reasons"] = reasons or None
        if self.texts is not None:
            messages = [
                _message("assistant", "".join(self.texts.get(i, ())), self.finish_reasons.get(i))
                for i in sorted(self.choices_seen)
            ]
            fields["output_messages"] = cap_messages(messages, self._cap)
        return fields


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


def provider_from(host: str | None, namespace: str | None, model: str | None) -> str | None:
    """Who served: ``provider/model`` names first, then well-known hosts."""
    for name in (namespace, model):
        if name and "/" in name:
            return name.split("/", 1)[0].lower()
    return PROVIDER_BY_HOST.get(host or "")


def _envelope(body: dict[str, Any], keep_content: bool) -> dict[str, Any]:
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    fields = {
        "response_id": as_str(body.get("id")),
        "response_object": as_str(body.get("object")),
        "created_at": _created(body.get("created")),
        "response_model": as_str(body.get("model")),
        "input_tokens": as_int(usage.get("prompt_tokens")),
        "output_tokens": as_int(usage.get("completion_tokens")),
        "total_tokens": as_int(usage.get("total_tokens")),
        "cached_input_tokens": as_int(prompt_details.get("cached_tokens"))
        if isinstance(prompt_details, dict)
        else None,
        "reasoning_tokens": as_int(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict)
        else None,
    }
    fields.update(pulze.metadata_fields(body.get("metadata"), keep_content))
    return fields


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


def _choice_text(choice: dict[str, Any]) -> str:
    """Generated text of a choice, message or stream delta alike."""
    for key in ("delta", "message"):
        part = choice.get(key)
        if isinstance(part, dict):
            return _text(part.get("content")) or _text(part.get("refusal"))
    return _text(choice.get("text"))


def _has_tool_calls(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta")
    return isinstance(delta, dict) and bool(delta.get("tool_calls") or delta.get("function_call"))


def _text(content: Any) -> str:
    """Message content is a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


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


def _message(role: str, content: str, finish_reason: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": role, "content": content}
    if finish_reason:
        message["finish_reason"] = finish_reason
    return message


def _input_messages(body: dict[str, Any], operation: str, cap: int) -> tuple[dict[str, Any], ...]:
    if operation == "chat":
        messages = body.get("messages")
        found = [
            _message(as_str(m.get("role")) or "user", _text(m.get("content")))
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
        found = [_message("user", p) for p in prompts]
    return cap_messages(found, cap)
