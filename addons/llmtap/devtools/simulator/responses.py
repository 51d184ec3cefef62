"""OpenAI Responses: ``POST /v1/responses`` (plain, streamed, background) and ``GET /v1/responses/{id}``.

Shapes from OpenAI's API reference (and the ``openai`` SDK's types): a ``response`` object with
``status`` and ``usage.{input_tokens, input_tokens_details.{cached_tokens, cache_write_tokens},
output_tokens, output_tokens_details.reasoning_tokens, total_tokens}``; streams are typed SSE
events (``event: response.created`` …, each with a ``sequence_number``), no ``[DONE]``, the usage
inside the final ``response.completed`` / ``response.incomplete`` / ``response.failed``.

Deterministic usage: a request with ``previous_response_id`` reads half its input from the
cache; one with ``prompt_cache_key`` writes the rest; ``o``-series models reason two tokens
per output word. Background mode answers ``queued`` without usage; the first ``GET`` of it
says ``in_progress``, every later one gives the finished response with usage.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from llmtap.devtools.simulator.common import (
    Call,
    JsonReply,
    Reply,
    Route,
    StreamReply,
    answer,
    dumps,
    openai_error,
    openai_payload,
    openai_route_error,
    text_of,
    token_count,
)

if TYPE_CHECKING:
    from llmtap.devtools.simulator.server import Simulator

#: Models served, and the snapshot name a response carries.
MODELS = {
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "o4-mini": "o4-mini-2025-04-16",
}
#: Background responses kept for polling (oldest dropped first).
BACKGROUND_LIMIT = 4096


def _usage(input_tokens: int, cached: int, written: int, output: int, reasoning: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output,
    }


def create(sim: Simulator, call: Call) -> Reply:
    payload = openai_payload(call.body)
    model = payload.get("model")
    if not isinstance(model, str):
        raise openai_error(
            400, "Missing required parameter: 'model'.", "invalid_request_error", "missing_required_parameter"
        )
    snapshot = MODELS.get(model) or next((s for m, s in MODELS.items() if model == s), None)
    if snapshot is None:
        raise openai_error(404, f"The model '{model}' does not exist.", "invalid_request_error", "model_not_found")
    if "input" not in payload:
        raise openai_error(
            400, "Missing required parameter: 'input'.", "invalid_request_error", "missing_required_parameter"
        )
    max_output = payload.get("max_output_tokens")
    if max_output is not None and (not isinstance(max_output, int) or max_output < 16):
        raise openai_error(400, "Invalid 'max_output_tokens': integer below minimum value 16.", "invalid_request_error")
    prompt = text_of(payload.get("instructions")) + "\n" + text_of(payload.get("input"))
    input_tokens = token_count(prompt) + 7  # message framing, as the real count has some
    reasoning_model = model.startswith("o")
    found, _ = answer(prompt, sim.seed, 17)
    reasoning = 2 * len(found) if reasoning_model else 0
    limit = max_output if isinstance(max_output, int) else None
    incomplete = call.fault == "incomplete" or (limit is not None and len(found) + reasoning > limit)
    if incomplete:
        keep = max(1, (limit or len(found)) - reasoning) if limit is not None else max(1, len(found) // 2)
        found = found[:keep]
    cached = input_tokens // 2 if isinstance(payload.get("previous_response_id"), str) else 0
    written = input_tokens - cached if isinstance(payload.get("prompt_cache_key"), str) else 0
    usage = _usage(input_tokens, cached, written, len(found) + reasoning, reasoning)
    rid = "resp_" + call.request_id[4:].replace("-", "")
    created = int(time.time())
    text = " ".join(found)
    status = "incomplete" if incomplete else "completed"
    final = _response(rid, created, snapshot, status, payload, text, usage)
    if payload.get("background") is True:
        queued = _response(rid, created, snapshot, "queued", payload, None, None)
        if len(sim.background) >= BACKGROUND_LIMIT:
            sim.background.pop(next(iter(sim.background)))
        sim.background[rid] = {"polls": 0, "final": final, "queued": queued}
        return JsonReply(200, dumps(queued))
    if payload.get("stream") is True:
        return StreamReply(_events(rid, created, snapshot, payload, found, final, call.fault), style="typed", done=None)
    if call.fault == "failed":
        return JsonReply(200, dumps(_failed(final)))
    return JsonReply(200, dumps(final))


def retrieve(sim: Simulator, call: Call) -> Reply:
    """``GET /v1/responses/{id}``: a background response, in progress on the first poll."""
    kept = sim.background.get(call.params["id"])
    if kept is None:
        raise openai_error(404, f"Response with id '{call.params['id']}' not found.", "invalid_request_error")
    kept["polls"] += 1
    if kept["polls"] == 1:
        return JsonReply(200, dumps({**kept["queued"], "status": "in_progress"}))
    return JsonReply(200, dumps(kept["final"]))


def _message(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _response(
    rid: str,
    created: int,
    model: str,
    status: str,
    payload: dict[str, Any],
    text: str | None,
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": payload.get("background") is True,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": payload.get("instructions"),
        "max_output_tokens": payload.get("max_output_tokens"),
        "model": model,
        "output": [] if text is None else [_message("msg_" + rid[5:], text, "completed")],
        "parallel_tool_calls": True,
        "previous_response_id": payload.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": True,
        "temperature": payload.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": payload.get("tool_choice", "auto"),
        "tools": payload.get("tools", []),
        "top_p": payload.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": payload.get("metadata") or {},
    }


def _failed(final: dict[str, Any]) -> dict[str, Any]:
    return {
        **final,
        "status": "failed",
        "output": [],
        "usage": None,
        "error": {"code": "server_error", "message": "The model failed to generate a response (simulated)."},
    }


def _events(
    rid: str,
    created: int,
    model: str,
    payload: dict[str, Any],
    found: tuple[str, ...],
    final: dict[str, Any],
    fault: str | None,
) -> Iterator[tuple[bool, dict[str, Any]]]:
    seq = iter(range(1_000_000))
    start = _response(rid, created, model, "in_progress", payload, None, None)
    item_id = "msg_" + rid[5:]
    yield False, {"type": "response.created", "sequence_number": next(seq), "response": start}
    yield False, {"type": "response.in_progress", "sequence_number": next(seq), "response": start}
    empty = {**_message(item_id, "", "in_progress"), "content": []}
    yield False, {"type": "response.output_item.added", "sequence_number": next(seq), "output_index": 0, "item": empty}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield False, {"type": "response.content_part.added", "sequence_number": next(seq), **where, "part": part}
    for i, word in enumerate(found):
        delta = word if i == 0 else " " + word
        yield (
            False,
            {
                "type": "response.output_text.delta",
                "sequence_number": next(seq),
                **where,
                "delta": delta,
                "logprobs": [],
            },
        )
        if fault == "stream-error" and i == 1:
            yield (
                True,
                {
                    "type": "error",
                    "sequence_number": next(seq),
                    "code": "server_error",
                    "message": "The server had an error while processing your request (simulated).",
                    "param": None,
                },
            )
            return
    text = " ".join(found)
    yield (
        False,
        {"type": "response.output_text.done", "sequence_number": next(seq), **where, "text": text, "logprobs": []},
    )
    yield (
        False,
        {"type": "response.content_part.done", "sequence_number": next(seq), **where, "part": {**part, "text": text}},
    )
    item = _message(item_id, text, "completed")
    yield False, {"type": "response.output_item.done", "sequence_number": next(seq), "output_index": 0, "item": item}
    if fault == "failed":
        yield True, {"type": "response.failed", "sequence_number": next(seq), "response": _failed(final)}
        return
    kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
    yield True, {"type": kind, "sequence_number": next(seq), "response": final}


def _routes(prefix: str, auth: str = "bearer") -> list[Route]:
    return [
        Route("POST", prefix + "/responses", create, auth, openai_route_error),
        Route("GET", prefix + "/responses/{id}", retrieve, auth, openai_route_error, faults=False),
    ]


ROUTES = _routes("/v1")
AZURE_ROUTES = _routes("/openai/v1", "azure")
