"""The shape every protocol family has: what the capture side calls, and nothing else.

A family recognises its requests (method, path, host), reads request and response bodies into
record fields, and gives a stream parser for streamed responses. Families are pure: parsed JSON
and decoded bytes in, field dicts out, no mitmproxy. The capture side loops over the registry
(``llmtap.protocols.registry``) and names no family.

Field dicts use ``ExchangeRecord`` field names, plus the declared intermediates in
``INTERMEDIATES`` that the finishing step consumes; anything else would be dropped silently, so
a test checks every key every family returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmtap.protocols.errors import error_message
from llmtap.protocols.sse import SSEDecoder

#: Keys a parser may return that are not record fields: the finishing step reads them.
INTERMEDIATES = frozenset({"reported_cost_usd"})


class StreamParser:
    """Reads a copy of a streamed response: fed decoded bytes, split anywhere.

    ``feed`` and ``close`` return True when the piece carried generated content (the first such
    piece is the time to first token). ``done`` turns True when the client has everything it
    will act on (for example ``data: [DONE]``): the record is finished then, before the last
    chunk is returned to the client, which may stop reading there.
    """

    __slots__ = ("done",)

    #: Set (as an instance attribute, by parsers that can tell) when the stream was not what
    #: the family's shape says: truncated, or an event of the wrong type. The record is kept;
    #: the capture side counts the problem.
    problem: str | None = None

    def __init__(self) -> None:
        self.done = False

    def feed(self, data: bytes) -> bool:
        raise NotImplementedError

    def close(self) -> bool:
        """The stream ended: read whatever was left unfinished."""
        return False

    def bound(self, memory_bytes: int) -> None:
        """Hold at most about ``memory_bytes`` for framing (a partial line, a pending event)."""

    @property
    def overflows(self) -> int:
        """Pieces dropped for being larger than the bound."""
        return 0

    def fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def overlay_body(self) -> dict[str, Any]:
        """The object overlays read (``metadata``, ``usage``), as a non-streamed body would hold it."""
        return {}


class SSEStreamParser(StreamParser):
    """A stream of Server-Sent Events: each event's data goes to ``event``."""

    __slots__ = ("_sse",)

    def __init__(self) -> None:
        super().__init__()
        self._sse = SSEDecoder()

    def feed(self, data: bytes) -> bool:
        return self._events(self._sse.feed(data))

    def bound(self, memory_bytes: int) -> None:
        self._sse.max_line = memory_bytes

    @property
    def overflows(self) -> int:
        return self._sse.overflows

    def close(self) -> bool:
        return self._events(self._sse.flush())

    def _events(self, payloads: list[bytes]) -> bool:
        carried = False
        for payload in payloads:
            if self.event(payload):
                carried = True
            if self.done:
                break
        return carried

    def event(self, data: bytes) -> bool:
        """One event's ``data``; True when it carried generated content."""
        raise NotImplementedError


class Overlay:
    """A router's extras on top of a family's shape (Pulze ``metadata``, OpenRouter ``usage.cost``).

    Request header fields are read from every request; response fields only where ``applies``.
    """

    #: The record's ``router`` when this overlay applies.
    router = "router"
    #: Names of the families whose exchanges it may apply to; None: any.
    families: frozenset[str] | None = None

    def applies(self, host: str | None, body: dict[str, Any]) -> bool:
        raise NotImplementedError

    def request_fields(self, headers: Mapping[str, str]) -> dict[str, Any]:
        return {}

    def response_fields(self, body: dict[str, Any], keep_content: bool) -> dict[str, Any]:
        raise NotImplementedError


class Family:
    """One API family. Subclasses are stateless singletons; per-stream state lives in parsers."""

    #: Short, stable name, recorded on each record.
    name = "family"
    #: ``gen_ai.provider.name`` when neither the body nor the host says who served.
    provider: str | None = None

    def operation(self, method: str, path: str, host: str | None) -> str | None:
        """The GenAI operation (``chat``, ``embeddings``, …) of a request this family reads, else None.

        ``path`` has no query string.
        """
        raise NotImplementedError

    def request_fields(
        self, body: Any, operation: str, path: str, query: str, content_cap: int | None
    ) -> dict[str, Any]:
        raise NotImplementedError

    def header_fields(self, headers: Mapping[str, str]) -> dict[str, Any]:
        """Fields of the request headers this family defines (lower-case names), such as a version."""
        return {}

    def response_fields(self, body: Any, content_cap: int | None) -> dict[str, Any]:
        raise NotImplementedError

    def error_fields(self, body: Any, raw: bytes | None) -> dict[str, Any]:
        return {"error_message": error_message(body, raw)}

    def streams(self, path: str, content_type: str) -> bool:
        """Whether the response is read as a stream, chunk by chunk (else buffered, then read)."""
        return "text/event-stream" in content_type

    def stream_parser(self, content_cap: int | None, content_type: str) -> StreamParser:
        raise NotImplementedError

    def poll_id(self, method: str, path: str) -> str | None:
        """The id of an earlier exchange this request polls for its result, else None.

        Such a request is recorded only while that exchange is pending, and only once it
        answers with a final result (see ``openai_responses``); otherwise it passes through.
        """
        return None
