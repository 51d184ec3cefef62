"""Anthropic Messages: ``POST /v1/messages`` (plain and streamed) and ``POST /v1/messages/count_tokens``.

Shapes from Anthropic's API reference (and the ``anthropic`` SDK's types). ``usage.input_tokens``
EXCLUDES the cache: a request's input is ``input_tokens + cache_creation_input_tokens +
cache_read_input_tokens``, with ``cache_creation.{ephemeral_5m_input_tokens,
ephemeral_1h_input_tokens}`` splitting the writes by time to live. Streams are typed SSE:
``message_start`` (usage so far), ``content_block_start``, ``ping``, ``content_block_delta``,
``content_block_stop``, ``message_delta`` (``stop_reason``, cumulative usage), ``message_stop``;
no ``[DONE]``. ``X-Sim-Fault: stream-error`` sends an ``error`` event inside the 200 stream.

Caching is stateful, as the real one: the prompt up to the last block marked ``cache_control``
is written on first sight (5 minutes, or 1 hour with ``"ttl": "1h"``) and read afterwards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from llmtap.devtools.simulator.common import (
    BadRequest,
    Call,
    JsonReply,
    Reply,
    Route,
    StreamReply,
    answer,
    digest,
    dumps,
    text_of,
    token_count,
)

if TYPE_CHECKING:
    from llmtap.devtools.simulator.server import Simulator

MODELS = (
    "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5-20251001",
    "claude-3-haiku-20240307",
    "claude-opus-4-1-20250805",
)
ALIASES = {"claude-sonnet-4-5": MODELS[0], "claude-haiku-4-5": MODELS[1], "claude-opus-4-1": MODELS[3]}
#: Cached prefixes remembered (oldest dropped first).
CACHE_LIMIT = 4096

_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    422: "invalid_request_error",
}
_KINDS |= {429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


def error(status: int, message: str) -> BadRequest:
    kind = _KINDS.get(status, "api_error")
    return BadRequest(status, {"type": "error", "error": {"type": kind, "message": message}})


def _blocks(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """System blocks then message content blocks, in prompt order."""
    found: list[dict[str, Any]] = []
    system = payload.get("system")
    if isinstance(system, str):
        found.append({"type": "text", "text": system})
    elif isinstance(system, list):
        found.extend(b for b in system if isinstance(b, dict))
    for message in payload.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            found.append({"type": "text", "text": content})
        elif isinstance(content, list):
            found.extend(b for b in content if isinstance(b, dict))
    return found


def _validated(call: Call) -> dict[str, Any]:
    if not call.headers.get("anthropic-version"):
        raise error(400, "anthropic-version: header is required")
    try:
        payload = json.loads(call.body)
    except ValueError:
        raise error(400, "There was an issue with your request body: invalid JSON") from None
    if not isinstance(payload, dict):
        raise error(400, "The request body must be a JSON object")
    if not isinstance(payload.get("messages"), list) or not payload["messages"]:
        raise error(400, "messages: Field required")
    return payload


def count_tokens(sim: Simulator, call: Call) -> Reply:
    payload = _validated(call)
    return JsonReply(200, dumps({"input_tokens": token_count(text_of(_blocks(payload)))}))


def create(sim: Simulator, call: Call) -> Reply:
    payload = _validated(call)
    model = payload.get("model")
    if not isinstance(model, str):
        raise error(400, "model: Field required")
    served = model if model in MODELS else ALIASES.get(model)
    if served is None:
        raise error(404, f"model: {model}")
    max_tokens = payload.get("max_tokens")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise error(400, "max_tokens: Field required")
    blocks = _blocks(payload)
    total = token_count(text_of(blocks)) + 3 * len(payload["messages"])
    marked = [i for i, b in enumerate(blocks) if isinstance(b.get("cache_control"), dict)]
    read = written_5m = written_1h = 0
    if marked:
        prefix = blocks[: marked[-1] + 1]
        prefix_tokens = min(total, token_count(text_of(prefix)))
        key = digest(served + json.dumps(prefix, sort_keys=True))
        if key in sim.prompt_cache:
            read = prefix_tokens
        else:
            if len(sim.prompt_cache) >= CACHE_LIMIT:
                sim.prompt_cache.pop(next(iter(sim.prompt_cache)))
            sim.prompt_cache[key] = time.time()
            if blocks[marked[-1]]["cache_control"].get("ttl") == "1h":
                written_1h = prefix_tokens
            else:
                written_5m = prefix_tokens
    found, cut = answer(text_of(blocks), sim.seed, 31, max_tokens)
    usage = {
        "input_tokens": total - read - written_5m - written_1h,
        "cache_creation_input_tokens": written_5m + written_1h,
        "cache_read_input_tokens": read,
        "cache_creation": {"ephemeral_5m_input_tokens": written_5m, "ephemeral_1h_input_tokens": written_1h},
        "output_tokens": len(found),
        "service_tier": "standard",
    }
    mid = "msg_" + call.request_id[4:].replace("-", "")
    stop = "max_tokens" if cut else "end_turn"
    if payload.get("stream") is True:
        return StreamReply(_events(mid, served, found, stop, usage, call.fault), style="typed", done=None)
    message = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": served,
        "content": [{"type": "text", "text": " ".join(found)}],
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage,
    }
    return JsonReply(200, dumps(message), headers=[("request-id", "req_" + mid[4:])])


def _events(
    mid: str, model: str, found: tuple[str, ...], stop: str, usage: dict[str, Any], fault: str | None
) -> Iterator[tuple[bool, dict[str, Any]]]:
    start_usage = {**usage, "output_tokens": 1}
    message = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    yield False, {"type": "message_start", "message": message}
    yield False, {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    yield False, {"type": "ping"}
    for i, word in enumerate(found):
        text = word if i == 0 else " " + word
        yield False, {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
        if fault == "stream-error" and i == 1:
            yield True, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            return
    yield False, {"type": "content_block_stop", "index": 0}
    final_usage = {k: usage[k] for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")}
    final_usage["output_tokens"] = usage["output_tokens"]
    yield False, {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}, "usage": final_usage}
    yield True, {"type": "message_stop"}


ROUTES = [
    Route("POST", "/v1/messages", create, "x-api-key", error),
    Route("POST", "/v1/messages/count_tokens", count_tokens, "x-api-key", error, faults=False),
]
