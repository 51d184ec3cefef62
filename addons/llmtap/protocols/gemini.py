"""Google Gemini: ``POST …/models/{model}:generateContent`` and ``:streamGenerateContent``.

The model comes from the path (the body has none). ``:streamGenerateContent?alt=sse`` streams
SSE events, each a ``GenerateContentResponse``, with no ``[DONE]``; without ``alt=sse`` it streams
one JSON array whose elements arrive as they are generated (``[{…},\\r\\n{…}]``), read here
element by element. The key may arrive as ``?key=``: the query string is never recorded.

Tokens in llmtap's one meaning: ``candidatesTokenCount`` excludes the thoughts, so
``output_tokens`` adds ``thoughtsTokenCount`` (also ``reasoning_tokens``); ``promptTokenCount``
includes cached content (``cached_input_tokens``); tool-use prompt tokens count as input.
"""

from __future__ import annotations

import re
from typing import Any

from llmtap.protocols.base import Family, SSEStreamParser, StreamParser
from llmtap.protocols.content import cap_messages, message
from llmtap.protocols.values import add_counts, as_count, as_float, as_int, as_str, load_json

_ACTIONS = {":generateContent": False, ":streamGenerateContent": True}


def model_and_stream(path: str) -> tuple[str, bool] | None:
    """``(model, streamed)`` of a ``…/models/{model}:action`` path, else None."""
    head, colon, action = path.rpartition(":")
    streamed = _ACTIONS.get(colon + action)
    marker = head.rfind("/models/")
    if streamed is None or marker < 0:
        return None
    return head[marker + len("/models/") :], streamed


class Gemini(Family):
    name = "gemini"
    provider = "gcp.gemini"

    def operation(self, method: str, path: str, host: str | None) -> str | None:
        return "chat" if method == "POST" and model_and_stream(path) is not None else None

    def request_fields(
        self, body: Any, operation: str, path: str, query: str, content_cap: int | None
    ) -> dict[str, Any]:
        found = model_and_stream(path)
        fields: dict[str, Any] = {"request_model": found[0] if found else None, "stream": bool(found and found[1])}
        if not isinstance(body, dict):
            return fields
        config = body.get("generationConfig")
        config = config if isinstance(config, dict) else {}
        stop = config.get("stopSequences")
        declarations = (
            [
                d
                for tool in body.get("tools") or ()
                if isinstance(tool, dict)
                for d in tool.get("functionDeclarations") or ()
                if isinstance(d, dict)
            ]
            if isinstance(body.get("tools"), list)
            else []
        )
        fields.update(
            max_tokens=as_int(config.get("maxOutputTokens")),
            temperature=as_float(config.get("temperature")),
            top_p=as_float(config.get("topP")),
            n=as_int(config.get("candidateCount")),
            seed=as_int(config.get("seed")),
            presence_penalty=as_float(config.get("presencePenalty")),
            frequency_penalty=as_float(config.get("frequencyPenalty")),
            stop=tuple(s for s in stop if isinstance(s, str)) or None if isinstance(stop, list) else None,
            tool_count=len(body["tools"]) if isinstance(body.get("tools"), list) else None,
            tool_names=tuple(n for d in declarations if (n := as_str(d.get("name")))) or None,
            response_format=as_str(config.get("responseMimeType")),
        )
        if content_cap is not None:
            fields["input_messages"] = _input_messages(body, content_cap)
        return fields

    def response_fields(self, body: Any, content_cap: int | None) -> dict[str, Any]:
        reader = ResponseReader(content_cap)
        reader.add(body)
        return reader.fields()

    def streams(self, path: str, content_type: str) -> bool:
        return path.endswith(":streamGenerateContent") or super().streams(path, content_type)

    def stream_parser(self, content_cap: int | None, content_type: str) -> StreamParser:
        if "text/event-stream" in content_type:
            return SSEResponses(content_cap)
        return ArrayResponses(content_cap)


FAMILY = Gemini()


class ResponseReader:
    """Fields from one or more ``GenerateContentResponse`` objects (the chunks of a stream)."""

    __slots__ = ("_cap", "_texts", "chunks", "finish_reasons", "model", "response_id", "usage")

    def __init__(self, content_cap: int | None) -> None:
        self._cap = content_cap
        self._texts: dict[int, list[str]] | None = {} if content_cap is not None else None
        self.chunks = 0
        self.finish_reasons: dict[int, str] = {}
        self.model: str | None = None
        self.response_id: str | None = None
        self.usage: dict[str, Any] = {}

    def add(self, chunk: Any) -> bool:
        """Take one response object; True when it carried generated content."""
        if not isinstance(chunk, dict):
            return False
        self.model = self.model or as_str(chunk.get("modelVersion"))
        self.response_id = self.response_id or as_str(chunk.get("responseId"))
        if isinstance(chunk.get("usageMetadata"), dict):  # the last one holds the totals
            self.usage = chunk["usageMetadata"]
        candidates = chunk.get("candidates")
        carried = False
        for position, candidate in enumerate(candidates if isinstance(candidates, list) else ()):
            if not isinstance(candidate, dict):
                continue
            index = as_int(candidate.get("index"))
            index = position if index is None else index
            if reason := as_str(candidate.get("finishReason")):
                self.finish_reasons[index] = reason
            content = candidate.get("content")
            parts = content.get("parts") if isinstance(content, dict) else None
            for part in parts if isinstance(parts, list) else ():
                if isinstance(part, dict) and (part.get("text") or part.get("functionCall")):
                    carried = True
                    if self._texts is not None and isinstance(part.get("text"), str) and not part.get("thought"):
                        self._texts.setdefault(index, []).append(part["text"])
        if carried:
            self.chunks += 1
        return carried

    def fields(self) -> dict[str, Any]:
        fields = usage_fields(self.usage)
        fields.update(
            response_id=self.response_id,
            response_model=self.model,
            finish_reasons=tuple(self.finish_reasons[i] for i in sorted(self.finish_reasons)) or None,
            choice_count=len(self.finish_reasons) or None,
        )
        if self._texts is not None:
            indexes = sorted(set(self._texts) | set(self.finish_reasons))
            fields["output_messages"] = cap_messages(
                [message("assistant", "".join(self._texts.get(i, ())), self.finish_reasons.get(i)) for i in indexes],
                self._cap,
            )
        return fields


def usage_fields(usage: Any) -> dict[str, Any]:
    """``usageMetadata`` in llmtap's token meaning (output includes the thoughts)."""
    if not isinstance(usage, dict):
        return {}
    prompt = as_count(usage.get("promptTokenCount"))
    tool_prompt = as_count(usage.get("toolUsePromptTokenCount"))
    candidates = as_count(usage.get("candidatesTokenCount"))
    thoughts = as_count(usage.get("thoughtsTokenCount"))
    output = None if candidates is None and thoughts is None else add_counts(candidates, thoughts)
    return {
        "input_tokens": None if prompt is None else add_counts(prompt, tool_prompt),
        "cached_input_tokens": as_count(usage.get("cachedContentTokenCount")),
        "output_tokens": output,
        "reasoning_tokens": thoughts,
        "total_tokens": as_count(usage.get("totalTokenCount")),
    }


class SSEResponses(SSEStreamParser):
    """``:streamGenerateContent?alt=sse``: each event's data is one response object."""

    __slots__ = ("reader",)

    def __init__(self, content_cap: int | None) -> None:
        super().__init__()
        self.reader = ResponseReader(content_cap)

    def event(self, data: bytes) -> bool:
        return self.reader.add(load_json(data))

    def fields(self) -> dict[str, Any]:
        fields = self.reader.fields()
        fields["chunk_count"] = self.reader.chunks
        return fields


#: What moves the JSON-array scanner: brackets, quotes and escapes; everything else is skipped.
_STRUCTURE = re.compile(rb'[{}\[\]"\\]')


class ArrayResponses(StreamParser):
    """``:streamGenerateContent`` without ``alt=sse``: one JSON array, read element by element.

    A small scanner tracks nesting, strings and escapes over the new bytes only (linear in the
    stream); each complete top-level element is parsed as it closes.
    """

    __slots__ = (
        "_depth",
        "_dropping",
        "_element",
        "_escape_next",
        "_in_string",
        "_max",
        "_overflows",
        "_size",
        "reader",
    )

    def __init__(self, content_cap: int | None) -> None:
        super().__init__()
        self.reader = ResponseReader(content_cap)
        self._depth = 0  # 1 inside the array, 2 and more inside an element
        self._in_string = False
        self._escape_next = False  # the previous piece ended on a backslash inside a string
        self._element: list[bytes] = []
        self._size = 0  # bytes held for the current element
        self._max = 16 << 20
        self._dropping = False  # the current element outgrew the bound: skipped to its end
        self._overflows = 0

    def bound(self, memory_bytes: int) -> None:
        self._max = memory_bytes

    @property
    def overflows(self) -> int:
        return self._overflows

    def _hold(self, piece: bytes) -> None:
        if self._dropping:
            return
        self._size += len(piece)
        if self._size > self._max:
            self._element, self._size, self._dropping = [], 0, True
            self._overflows += 1
            return
        self._element.append(piece)

    def feed(self, data: bytes) -> bool:
        carried = False
        start = 0  # where the current element's bytes begin in ``data``
        escaped_at = 0 if self._escape_next else -1  # the position of a byte a backslash escapes
        for match in _STRUCTURE.finditer(data):
            at = match.start()
            if at == escaped_at:
                continue
            char = data[at]
            if self._in_string:
                if char == 0x5C:  # backslash
                    escaped_at = at + 1
                elif char == 0x22:  # quote
                    self._in_string = False
            elif char == 0x22:
                self._in_string = True
            elif char in (0x7B, 0x5B):  # { [
                self._depth += 1
                if self._depth == 2:
                    start, self._element, self._size, self._dropping = at, [], 0, False
            elif self._depth > 0:  # } ]
                self._depth -= 1
                if self._depth == 1:
                    self._hold(data[start : at + 1])
                    if not self._dropping:
                        carried = self.reader.add(load_json(b"".join(self._element))) or carried
                    self._element, self._size = [], 0
                elif self._depth == 0:
                    self.done = True
        self._escape_next = escaped_at == len(data)
        if self._depth >= 2:
            self._hold(data[start:])
        return carried

    def fields(self) -> dict[str, Any]:
        fields = self.reader.fields()
        fields["chunk_count"] = self.reader.chunks
        return fields


def _input_messages(body: dict[str, Any], cap: int) -> tuple[dict[str, Any], ...]:
    found = []
    system = body.get("systemInstruction")
    if isinstance(system, dict) and (text := _parts_text(system.get("parts"))):
        found.append(message("system", text))
    contents = body.get("contents")
    for content in contents if isinstance(contents, list) else ():
        if isinstance(content, dict):
            found.append(message(as_str(content.get("role")) or "user", _parts_text(content.get("parts"))))
    return cap_messages(found, cap)


def _parts_text(parts: Any) -> str:
    if not isinstance(parts, list):
        return ""
    return "".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
