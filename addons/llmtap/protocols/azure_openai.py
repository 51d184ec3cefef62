"""Azure OpenAI: the OpenAI shapes (Chat Completions, Completions, embeddings, Responses) on Azure's paths.

``/openai/deployments/{deployment}/{chat/completions|completions|embeddings}?api-version=…``
(the deployment names the model when the body has none) and the v1 paths
``/openai/v1/{chat/completions|completions|embeddings|responses}`` (the model in the body is a
deployment name). The key arrives in ``api-key`` (or as a Bearer token). ``/openai/v1/`` is also
Groq's path: it counts as Azure's unless the host is a known other provider's.

Bodies are OpenAI's, read by the OpenAI families' own functions: this family adds only what
Azure's paths say, and names the provider ``azure`` (``gen_ai.provider.name`` ``azure.ai.openai``).
"""

from __future__ import annotations

from typing import Any

from llmtap.protocols import chat_completions, embeddings, openai_responses
from llmtap.protocols.base import Family, StreamParser
from llmtap.protocols.providers import PROVIDER_BY_HOST

_DEPLOYMENTS = "/openai/deployments/"


def deployment_of(path: str) -> str | None:
    if not path.startswith(_DEPLOYMENTS):
        return None
    name = path[len(_DEPLOYMENTS) :].split("/", 1)[0]
    return name or None


def _shape(method: str, path: str) -> tuple[Family, str] | None:
    """The OpenAI family whose shape this Azure path has, and the operation."""
    for family in (openai_responses.FAMILY, embeddings.FAMILY, chat_completions.FAMILY):
        operation = family.operation(method, path, None)
        if operation is not None:
            return family, operation
    return None


class AzureOpenAI(Family):
    name = "azure_openai"
    provider = "azure"

    def operation(self, method: str, path: str, host: str | None) -> str | None:
        if path.startswith(_DEPLOYMENTS) or (path.startswith("/openai/v1/") and host not in PROVIDER_BY_HOST):
            shape = _shape(method, path)
            return shape[1] if shape else None
        return None

    def poll_id(self, method: str, path: str) -> str | None:
        return openai_responses.poll_id_of(method, path)

    def request_fields(
        self, body: Any, operation: str, path: str, query: str, content_cap: int | None
    ) -> dict[str, Any]:
        shape = _shape("POST", path)  # a GET (a Responses poll) has no body to read
        family = shape[0] if shape else openai_responses.FAMILY
        fields = family.request_fields(body, operation, path, query, content_cap)
        if fields.get("request_model") is None:
            fields["request_model"] = deployment_of(path)
        if "api-version=" in query:
            fields["api_version"] = next(
                (v[:40] for k, _, v in (p.partition("=") for p in query.split("&")) if k == "api-version"), None
            )
        return fields

    def response_fields(self, body: Any, content_cap: int | None) -> dict[str, Any]:
        return _by_body(body).response_fields(body, content_cap)

    def stream_parser(self, content_cap: int | None, content_type: str) -> StreamParser:
        return _AzureStream(content_cap, content_type)


def _by_body(body: Any) -> Family:
    """Which shape a response body has: a Responses object, an embeddings list, else a completion."""
    if isinstance(body, dict):
        if body.get("object") == "response":
            return openai_responses.FAMILY
        if body.get("object") == "list" and isinstance(body.get("data"), list):
            return embeddings.FAMILY
    return chat_completions.FAMILY


class _AzureStream(StreamParser):
    """Chat Completions' or Responses' stream parser, picked by the first event (typed or not)."""

    __slots__ = ("_bound", "_cap", "_content_type", "_head", "_inner")

    def __init__(self, content_cap: int | None, content_type: str) -> None:
        super().__init__()
        self._cap = content_cap
        self._content_type = content_type
        self._inner: StreamParser | None = None
        self._head = b""
        self._bound: int | None = None

    def bound(self, memory_bytes: int) -> None:
        self._bound = memory_bytes
        if self._inner is not None:
            self._inner.bound(memory_bytes)

    @property
    def overflows(self) -> int:
        return self._inner.overflows if self._inner is not None else 0

    def _start(self, family: Family) -> StreamParser:
        inner = family.stream_parser(self._cap, self._content_type)
        if self._bound is not None:
            inner.bound(self._bound)
        self._inner = inner
        return inner

    def feed(self, data: bytes) -> bool:
        if self._inner is None:
            self._head += data
            text = self._head.lstrip()
            if len(text) < 6 and len(self._head) < 4096 and not self._head.endswith(b"\n\n"):
                return False
            typed = (
                text.startswith(b"event:") or b'"type":"response.' in text[:200] or b'"type": "response.' in text[:200]
            )
            family = openai_responses.FAMILY if typed else chat_completions.FAMILY
            self._start(family)
            data, self._head = self._head, b""
        carried = self._inner.feed(data)
        self.done = self._inner.done
        return carried

    def close(self) -> bool:
        if self._inner is None:
            if not self._head:
                return False
            self._start(chat_completions.FAMILY).feed(self._head)
        carried = self._inner.close()
        self.done = self._inner.done
        return carried

    def fields(self) -> dict[str, Any]:
        return self._inner.fields() if self._inner is not None else {}

    def overlay_body(self) -> dict[str, Any]:
        return self._inner.overlay_body() if self._inner is not None else {}

    @property
    def problem(self) -> str | None:
        return getattr(self._inner, "problem", None)


FAMILY = AzureOpenAI()
