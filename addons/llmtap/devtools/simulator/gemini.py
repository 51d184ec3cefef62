"""Google Gemini: ``POST /v1beta/models/{model}:generateContent`` and ``:streamGenerateContent``.

Shapes from the Gemini API reference (and ``google-genai``'s types): ``candidates[].content.parts``,
``finishReason``, ``usageMetadata.{promptTokenCount, candidatesTokenCount, cachedContentTokenCount,
thoughtsTokenCount, totalTokenCount}`` — ``promptTokenCount`` includes the cached tokens and
``candidatesTokenCount`` EXCLUDES the thoughts. The key is ``x-goog-api-key`` or ``?key=``.
``streamGenerateContent?alt=sse`` streams ``data:`` events (CRLF line ends); without ``alt=sse``
it streams one JSON array whose elements arrive one by one. Every chunk carries
``usageMetadata`` (the prompt so far), the last one the whole count.

2.5 models think three tokens per output word unless ``thinkingConfig.thinkingBudget`` is 0;
a request naming ``cachedContent`` reads half its prompt from that cache.
"""

from __future__ import annotations

import json
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
    dumps,
    text_of,
    token_count,
)

if TYPE_CHECKING:
    from llmtap.devtools.simulator.server import Simulator

MODELS = ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.0-flash", "gemini-2.5-flash-lite")

_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND"}
_STATUS |= {422: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


def error(status: int, message: str) -> BadRequest:
    return BadRequest(status, {"error": {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}})


def _prepare(sim: Simulator, call: Call) -> tuple[str, dict[str, Any], tuple[str, ...], str, dict[str, Any]]:
    model = call.params["model"]
    if model not in MODELS:
        raise error(404, f"models/{model} is not found for API version v1beta, or is not supported.")
    try:
        payload = json.loads(call.body)
    except ValueError:
        raise error(400, "Invalid JSON payload received.") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("contents"), list) or not payload["contents"]:
        raise error(400, "* GenerateContentRequest.contents: contents is not specified")
    config = payload.get("generationConfig") if isinstance(payload.get("generationConfig"), dict) else {}
    limit = config.get("maxOutputTokens")
    prompt = text_of(payload.get("systemInstruction")) + "\n" + text_of(payload["contents"])
    prompt_tokens = token_count(prompt)
    found, cut = answer(prompt, sim.seed, 53, limit if isinstance(limit, int) and limit > 0 else None)
    thinking = config.get("thinkingConfig") if isinstance(config.get("thinkingConfig"), dict) else {}
    thoughts = 3 * len(found) if "2.5" in model and thinking.get("thinkingBudget") != 0 else 0
    usage: dict[str, Any] = {"promptTokenCount": prompt_tokens, "candidatesTokenCount": len(found)}
    if isinstance(payload.get("cachedContent"), str):
        usage["cachedContentTokenCount"] = prompt_tokens // 2
    usage["totalTokenCount"] = prompt_tokens + len(found) + thoughts
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt_tokens}]
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return model, usage, found, "MAX_TOKENS" if cut else "STOP", payload


def generate(sim: Simulator, call: Call) -> Reply:
    model, usage, found, finish, _ = _prepare(sim, call)
    rid = call.request_id[4:].replace("-", "")
    body = {
        "candidates": [
            {
                "content": {"parts": [{"text": " ".join(found)}], "role": "model"},
                "finishReason": finish,
                "index": 0,
            }
        ],
        "usageMetadata": usage,
        "modelVersion": model,
        "responseId": rid,
    }
    return JsonReply(200, dumps(body))


def stream(sim: Simulator, call: Call) -> Reply:
    model, usage, found, finish, _ = _prepare(sim, call)
    rid = call.request_id[4:].replace("-", "")
    events = _events(model, rid, usage, found, finish)
    if call.query.get("alt") == "sse":
        return StreamReply(events, style="data", done=None, crlf=True)
    return StreamReply(events, style="array", done=None, content_type="application/json; charset=UTF-8")


def _events(
    model: str, rid: str, usage: dict[str, Any], found: tuple[str, ...], finish: str
) -> Iterator[tuple[bool, dict[str, Any]]]:
    so_far = {"promptTokenCount": usage["promptTokenCount"], "totalTokenCount": usage["promptTokenCount"]}
    for i, word in enumerate(found):
        last = i == len(found) - 1
        candidate: dict[str, Any] = {"content": {"parts": [{"text": word if i == 0 else " " + word}], "role": "model"}}
        if last:
            candidate["finishReason"] = finish
        candidate["index"] = 0
        yield (
            last,
            {
                "candidates": [candidate],
                "usageMetadata": usage if last else so_far,
                "modelVersion": model,
                "responseId": rid,
            },
        )


ROUTES = [
    route
    for version in ("v1beta", "v1")  # google-genai 3 calls /v1
    for route in (
        Route("POST", f"/{version}/models/{{model}}:generateContent", generate, "google", error),
        Route("POST", f"/{version}/models/{{model}}:streamGenerateContent", stream, "google", error),
    )
]
