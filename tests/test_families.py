"""The protocol-family contract: the registry, the keys every parser returns, streams split anywhere.

Every registered family must have samples here (``SAMPLES``): a new family without them fails
``test_every_family_has_samples``, so its parsers get the key check below.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_family_anthropic_gemini import (
    ANTHROPIC_REQUEST,
    ANTHROPIC_RESPONSE,
    GEMINI_REQUEST,
    GEMINI_RESPONSE,
    anthropic_stream,
    gemini_array_stream,
)
from test_parsers import REFERENCE_REQUEST, REFERENCE_RESPONSE

from llmtap.protocols import registry
from llmtap.protocols.base import INTERMEDIATES, Family
from llmtap.record import FIELD_NAMES

PROPERTY = settings(derandomize=True, deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])

CHAT_STREAM = (
    b"".join(
        b"data: " + json.dumps(event).encode() + b"\n\n"
        for event in [
            {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o", "created": 1701483003, "choices": []},
            {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hel"}}]},
            {"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
            {"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}},
        ]
    )
    + b"data: [DONE]\n\n"
)


RESPONSES_REQUEST = {
    "model": "o4-mini",
    "instructions": "Be brief.",
    "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}],
    "tools": [{"type": "function", "name": "get_weather", "parameters": {}}, {"type": "web_search"}],
    "tool_choice": "auto",
    "max_output_tokens": 256,
    "temperature": 0.5,
    "top_p": 0.9,
    "previous_response_id": "resp_prev",
    "stream": True,
}
RESPONSES_RESPONSE = {
    "id": "resp_1",
    "object": "response",
    "created_at": 1741476542,
    "status": "completed",
    "model": "o4-mini-2025-04-16",
    "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi there"}]}],
    "usage": {
        "input_tokens": 40,
        "input_tokens_details": {"cached_tokens": 16, "cache_write_tokens": 0},
        "output_tokens": 30,
        "output_tokens_details": {"reasoning_tokens": 20},
        "total_tokens": 70,
    },
}


def typed_sse(events: list[dict]) -> bytes:
    return b"".join(
        b"event: " + event["type"].encode() + b"\ndata: " + json.dumps(event).encode() + b"\n\n" for event in events
    )


RESPONSES_STREAM = typed_sse(
    [
        {
            "type": "response.created",
            "sequence_number": 0,
            "response": {**RESPONSES_RESPONSE, "status": "in_progress", "usage": None},
        },
        {"type": "response.output_text.delta", "sequence_number": 1, "delta": "Hi", "item_id": "m", "output_index": 0},
        {
            "type": "response.output_text.delta",
            "sequence_number": 2,
            "delta": " there",
            "item_id": "m",
            "output_index": 0,
        },
        {"type": "response.future_event_kind", "sequence_number": 3},
        {"type": "response.completed", "sequence_number": 4, "response": RESPONSES_RESPONSE},
    ]
)
EMBEDDINGS_REQUEST = {"model": "text-embedding-3-small", "input": ["a", "b c"], "dimensions": 3}
EMBEDDINGS_RESPONSE = {
    "object": "list",
    "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(2)],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 3, "total_tokens": 3},
}

#: family name -> (method, path, request body, response body, error body, stream bytes)
SAMPLES = {
    "openai_responses": (
        "POST",
        "/v1/responses",
        RESPONSES_REQUEST,
        RESPONSES_RESPONSE,
        {"error": {"message": "Invalid model", "type": "invalid_request_error"}},
        RESPONSES_STREAM,
    ),
    "embeddings": (
        "POST",
        "/v1/embeddings",
        EMBEDDINGS_REQUEST,
        EMBEDDINGS_RESPONSE,
        {"error": {"message": "Invalid input", "type": "invalid_request_error"}},
        b"",
    ),
    "azure_openai": (
        "POST",
        "/openai/deployments/my-gpt4o/chat/completions",
        {k: v for k, v in REFERENCE_REQUEST.items() if k != "model"},
        REFERENCE_RESPONSE,
        {"error": {"code": "429", "message": "Requests have exceeded the rate limit"}},
        CHAT_STREAM,
    ),
    "chat_completions": (
        "POST",
        "/v1/chat/completions",
        REFERENCE_REQUEST,
        REFERENCE_RESPONSE,
        {"error": {"message": "Rate limit", "type": "rate_limit"}},
        CHAT_STREAM,
    ),
    "anthropic_messages": (
        "POST",
        "/v1/messages",
        ANTHROPIC_REQUEST,
        ANTHROPIC_RESPONSE,
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        anthropic_stream(error=True) + anthropic_stream(),
    ),
    "gemini": (
        "POST",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        GEMINI_REQUEST,
        GEMINI_RESPONSE,
        {"error": {"code": 400, "message": "API key not valid", "status": "INVALID_ARGUMENT"}},
        gemini_array_stream(),
    ),
}


OPENROUTER_BYOK = {
    "id": "gen-1",
    "model": "openai/gpt-4o",
    "choices": [],
    "usage": {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "total_tokens": 7,
        "cost": 0.001,
        "is_byok": True,
        "cost_details": {"upstream_inference_cost": 0.02},
    },
}


def family_named(name: str) -> Family:
    return next(family for family in registry.FAMILIES if family.name == name)


def test_every_family_has_samples() -> None:
    assert {family.name for family in registry.FAMILIES} == set(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("content_cap", [None, 64])
def test_every_key_a_family_returns_is_a_record_field(name: str, content_cap: int | None) -> None:
    family = family_named(name)
    method, path, request, response, error, stream = SAMPLES[name]
    found = registry.find(method, path, "127.0.0.1")
    assert found is not None and found[0] is family
    parser = family.stream_parser(content_cap, "application/json" if name == "gemini" else "text/event-stream")
    parser.feed(stream)
    parser.close()
    returned = {
        **family.request_fields(request, found[1], path, "", content_cap),
        **family.header_fields({"anthropic-version": "2023-06-01", "api-key": "k"}),
        **family.response_fields(response, content_cap),
        **family.error_fields(error, json.dumps(error).encode()),
        **parser.fields(),
    }
    for overlay in registry.OVERLAYS:
        returned |= overlay.request_fields({"pulze-labels": '{"team": "a"}'})
        returned |= overlay.response_fields(response, content_cap is not None)
        returned |= overlay.response_fields(OPENROUTER_BYOK, content_cap is not None)
    unknown = set(returned) - set(FIELD_NAMES) - INTERMEDIATES
    assert not unknown, f"{name} returns keys that are no record field: {sorted(unknown)}"


@pytest.mark.parametrize(
    "method, path, host, expected",
    [
        ("POST", "/v1/chat/completions", "api.openai.com", ("chat_completions", "chat")),
        ("POST", "/v1/completions", "api.pulze.ai", ("chat_completions", "text_completion")),
        ("GET", "/v1/chat/completions", "api.openai.com", None),
        ("POST", "/v1/models/rank", "api.pulze.ai", None),
    ],
)
def test_registry_finds_the_family_by_method_and_path(method, path, host, expected) -> None:
    found = registry.find(method, path, host)
    assert (found[0].name, found[1]) == expected if expected else found is None


def test_finish_applies_the_overlay_and_names_router_and_provider() -> None:
    family = family_named("chat_completions")
    fields = {"upstream_host": "api.pulze.ai", **family.response_fields(REFERENCE_RESPONSE, None)}
    registry.finish(fields, family, REFERENCE_RESPONSE, False)
    assert fields["router"] == "pulze" and fields["provider"] == "openai"
    assert fields["reported_cost_usd"] == 0.00066

    plain = {"upstream_host": "api.openai.com", "response_model": "gpt-4o"}
    registry.finish(plain, family, {"id": "x"}, False)
    assert plain["router"] is None and plain["provider"] == "openai"


@PROPERTY
@given(st.lists(st.integers(min_value=0, max_value=len(CHAT_STREAM)), max_size=12))
def test_a_stream_split_anywhere_reads_as_one_piece(cuts: list[int]) -> None:
    family = family_named("chat_completions")
    whole = family.stream_parser(None, "text/event-stream")
    whole.feed(CHAT_STREAM)
    bounds = [0, *sorted(cuts), len(CHAT_STREAM)]
    split = family.stream_parser(None, "text/event-stream")
    carried = [split.feed(CHAT_STREAM[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert split.done and whole.done
    assert split.fields() == whole.fields()
    assert carried.count(True) >= 1 and split.fields()["chunk_count"] == 2
