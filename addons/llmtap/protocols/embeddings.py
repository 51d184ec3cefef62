"""OpenAI-shaped embeddings: ``POST …/embeddings`` (OpenAI, Azure OpenAI, OpenRouter, local servers).

Request: ``model``, ``input`` (a string, a list of strings, a token list or a list of token
lists), ``dimensions``. Response: ``data[].embedding`` (floats, or base64 little-endian float32
with ``encoding_format: "base64"``, the ``openai`` SDK's default) and ``usage.prompt_tokens``.
An embedding generates no tokens: ``output_tokens`` is 0, so the cost is input tokens × the
model's input price. Embeddings never stream.
"""

from __future__ import annotations

from typing import Any

from llmtap.protocols.base import Family, StreamParser
from llmtap.protocols.content import cap_messages, message
from llmtap.protocols.values import as_int, as_str


def operation_for(method: str, path: str) -> str | None:
    return "embeddings" if method == "POST" and path.endswith("/embeddings") else None


def input_count(value: Any) -> int | None:
    """How many inputs: a string or one token list is one; a list of strings or token lists, its length."""
    if isinstance(value, str):
        return 1
    if isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return 1
        return len(value)
    return None


def request_fields(body: Any, content_cap: int | None) -> dict[str, Any]:
    if not isinstance(body, dict):
        return {}
    value = body.get("input")
    fields: dict[str, Any] = {
        "request_model": as_str(body.get("model")),
        "input_count": input_count(value),
        "dimensions": as_int(body.get("dimensions")),
        "response_format": as_str(body.get("encoding_format")),
        "stream": False,
    }
    if content_cap is not None:
        texts = (
            [value]
            if isinstance(value, str)
            else [v for v in value if isinstance(v, str)]
            if isinstance(value, list)
            else []
        )
        fields["input_messages"] = cap_messages([message("user", t) for t in texts], content_cap)
    return fields


def dimensions_of(embedding: Any) -> int | None:
    """The length of one vector: a list's, or a base64 float32 string's (4 bytes a value), without decoding."""
    if isinstance(embedding, list):
        return len(embedding)
    if isinstance(embedding, str) and len(embedding) % 4 == 0:
        size = len(embedding) * 3 // 4 - len(embedding[-2:]) + len(embedding[-2:].rstrip("="))
        return size // 4 if size % 4 == 0 else None
    return None


def response_fields(body: Any, content_cap: int | None) -> dict[str, Any]:
    if not isinstance(body, dict):
        return {}
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    data = body.get("data")
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    input_tokens = as_int(usage.get("prompt_tokens"))
    fields: dict[str, Any] = {
        "response_object": as_str(body.get("object")),
        "response_model": as_str(body.get("model")),
        "input_tokens": input_tokens,
        "output_tokens": 0 if input_tokens is not None else None,
        "total_tokens": as_int(usage.get("total_tokens")),
        "choice_count": len(data) if isinstance(data, list) else None,
    }
    if (size := dimensions_of(first.get("embedding"))) is not None:
        fields["dimensions"] = size
    return fields


class NoStream(StreamParser):
    """Embeddings never stream; a server that does anyway is read as nothing, and said so."""

    __slots__ = ("problem",)

    def __init__(self) -> None:
        super().__init__()
        self.problem: str | None = None

    def feed(self, data: bytes) -> bool:
        if data:
            self.problem = "embeddings answered with a stream"
        return False

    def fields(self) -> dict[str, Any]:
        return {}


class Embeddings(Family):
    name = "embeddings"

    def operation(self, method: str, path: str, host: str | None) -> str | None:
        return operation_for(method, path)

    def request_fields(
        self, body: Any, operation: str, path: str, query: str, content_cap: int | None
    ) -> dict[str, Any]:
        return request_fields(body, content_cap)

    def response_fields(self, body: Any, content_cap: int | None) -> dict[str, Any]:
        return response_fields(body, content_cap)

    def stream_parser(self, content_cap: int | None, content_type: str) -> NoStream:
        return NoStream()


FAMILY = Embeddings()
