"""The Anthropic Messages and Gemini families, field by field, on bodies shaped like their API references."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmtap.protocols import anthropic_messages, gemini, registry

PROPERTY = settings(derandomize=True, deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])

ANTHROPIC_REQUEST = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 1024,
    "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "user", "content": "Hello, Claude"}],
    "temperature": 0.2,
    "stop_sequences": ["END"],
    "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
    "tool_choice": {"type": "tool", "name": "get_weather"},
    "stream": True,
}

ANTHROPIC_RESPONSE = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "Hi! My name is Claude."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 10,
        "cache_creation_input_tokens": 200,
        "cache_read_input_tokens": 1000,
        "cache_creation": {"ephemeral_5m_input_tokens": 150, "ephemeral_1h_input_tokens": 50},
        "output_tokens": 25,
        "service_tier": "standard",
    },
}


def anthropic_stream(error: bool = False) -> bytes:
    events = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    **ANTHROPIC_RESPONSE,
                    "content": [],
                    "stop_reason": None,
                    "usage": {**ANTHROPIC_RESPONSE["usage"], "output_tokens": 1},
                },
            },
        ),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi! "}},
        ),
        ("something_new", {"type": "something_new", "index": 0}),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Bye."}},
        ),
    ]
    if error:
        events.append(("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
    else:
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 25},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)


def test_anthropic_request_fields() -> None:
    fields = anthropic_messages.FAMILY.request_fields(ANTHROPIC_REQUEST, "chat", "/v1/messages", "", 50)
    assert fields["request_model"] == "claude-sonnet-4-5" and fields["max_tokens"] == 1024
    assert fields["temperature"] == 0.2 and fields["stop"] == ("END",) and fields["stream"] is True
    assert fields["tool_count"] == 1 and fields["tool_names"] == ("get_weather",)
    assert fields["tool_choice"] == "function:get_weather"
    assert fields["input_messages"] == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello, Claude"},
    )


def test_anthropic_version_header_is_recorded() -> None:
    assert anthropic_messages.FAMILY.header_fields({"anthropic-version": "2023-06-01"}) == {"api_version": "2023-06-01"}
    assert anthropic_messages.FAMILY.header_fields({}) == {"api_version": None}


def test_anthropic_tokens_take_llmtaps_meaning() -> None:
    fields = anthropic_messages.FAMILY.response_fields(ANTHROPIC_RESPONSE, None)
    # Anthropic's input_tokens (10) excludes cache reads (1000) and writes (200): llmtap's includes them
    assert fields["input_tokens"] == 1210 and fields["cached_input_tokens"] == 1000
    assert fields["cache_write_input_tokens"] == 200 and fields["cache_write_1h_input_tokens"] == 50
    assert fields["output_tokens"] == 25 and fields["total_tokens"] == 1235
    assert fields["response_id"] == "msg_013Zva2CMHLNnXjNJJKqJ2EF"
    assert fields["response_model"] == "claude-sonnet-4-5-20250929"
    assert fields["finish_reasons"] == ("end_turn",) and fields["service_tier"] == "standard"
    assert "output_messages" not in fields


def test_anthropic_cache_writes_from_the_split_alone() -> None:
    usage = {
        "input_tokens": 5,
        "cache_creation": {"ephemeral_5m_input_tokens": 7, "ephemeral_1h_input_tokens": 3},
        "output_tokens": 1,
    }
    fields = anthropic_messages.usage_fields(usage)
    assert fields["cache_write_input_tokens"] == 10 and fields["input_tokens"] == 15


def test_anthropic_stream_ends_at_message_stop_with_final_usage() -> None:
    parser = anthropic_messages.FAMILY.stream_parser(100, "text/event-stream")
    stream = anthropic_stream()
    carried = parser.feed(stream[: stream.index(b"message_stop")])
    assert carried and not parser.done
    parser.feed(stream[stream.index(b"message_stop") :])
    assert parser.done
    fields = parser.fields()
    assert fields["input_tokens"] == 1210 and fields["output_tokens"] == 25  # message_delta's count wins
    assert fields["chunk_count"] == 2 and fields["finish_reasons"] == ("end_turn",)
    assert fields["output_messages"] == ({"role": "assistant", "content": "Hi! Bye.", "finish_reason": "end_turn"},)
    assert "error_type" not in fields


def test_anthropic_error_event_inside_a_200_stream() -> None:
    parser = anthropic_messages.FAMILY.stream_parser(None, "text/event-stream")
    parser.feed(anthropic_stream(error=True))
    fields = parser.fields()
    assert parser.done and fields["error_type"] == anthropic_messages.STREAM_ERROR
    assert fields["error_message"] == "overloaded_error: Overloaded"


@pytest.mark.parametrize(
    "method, path, expected",
    [
        ("POST", "/v1/messages", "anthropic_messages"),
        ("POST", "/anthropic/v1/messages", "anthropic_messages"),
        ("POST", "/v1/messages/count_tokens", None),
        ("POST", "/v1/messages/batches", None),
        ("GET", "/v1/messages", None),
        ("POST", "/v1beta/models/gemini-2.5-flash:generateContent", "gemini"),
        ("POST", "/v1beta/models/gemini-2.5-pro:streamGenerateContent", "gemini"),
        ("POST", "/v1/projects/p/locations/us/publishers/google/models/gemini-2.5-pro:generateContent", "gemini"),
        ("POST", "/v1beta/models/gemini-2.5-pro:countTokens", None),
        ("POST", "/v1beta/models/gemini-embedding-001:embedContent", None),
    ],
)
def test_registry_finds_anthropic_and_gemini(method: str, path: str, expected: str | None) -> None:
    found = registry.find(method, path, None)
    assert (found[0].name if found else None) == expected


GEMINI_REQUEST = {
    "contents": [{"role": "user", "parts": [{"text": "Explain how AI works"}]}],
    "systemInstruction": {"parts": [{"text": "You are a cat."}]},
    "generationConfig": {
        "temperature": 0.7,
        "topP": 0.9,
        "maxOutputTokens": 800,
        "stopSequences": ["x"],
        "candidateCount": 1,
        "thinkingConfig": {"thinkingBudget": 1024},
    },
    "tools": [{"functionDeclarations": [{"name": "lookup"}, {"name": "fetch"}]}],
}

GEMINI_RESPONSE = {
    "candidates": [
        {"content": {"parts": [{"text": "AI learns patterns."}], "role": "model"}, "finishReason": "STOP", "index": 0}
    ],
    "usageMetadata": {
        "promptTokenCount": 120,
        "cachedContentTokenCount": 100,
        "candidatesTokenCount": 40,
        "thoughtsTokenCount": 300,
        "totalTokenCount": 460,
    },
    "modelVersion": "gemini-2.5-flash",
    "responseId": "mAitaLmkHPPlz7IPvtfUqQ4",
}


def test_gemini_request_takes_the_model_from_the_path() -> None:
    path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    fields = gemini.FAMILY.request_fields(GEMINI_REQUEST, "chat", path, "alt=sse&key=SECRET", 1000)
    assert fields["request_model"] == "gemini-2.5-flash" and fields["stream"] is True
    assert fields["temperature"] == 0.7 and fields["top_p"] == 0.9 and fields["max_tokens"] == 800
    assert fields["stop"] == ("x",) and fields["n"] == 1
    assert fields["tool_count"] == 1 and fields["tool_names"] == ("lookup", "fetch")
    assert fields["input_messages"][0] == {"role": "system", "content": "You are a cat."}
    assert "SECRET" not in json.dumps(fields)


def test_gemini_output_includes_the_thoughts() -> None:
    fields = gemini.FAMILY.response_fields(GEMINI_RESPONSE, None)
    assert fields["input_tokens"] == 120 and fields["cached_input_tokens"] == 100
    assert fields["output_tokens"] == 340 and fields["reasoning_tokens"] == 300
    assert fields["total_tokens"] == 460
    assert fields["response_model"] == "gemini-2.5-flash" and fields["response_id"] == "mAitaLmkHPPlz7IPvtfUqQ4"
    assert fields["finish_reasons"] == ("STOP",) and fields["choice_count"] == 1


def gemini_chunks() -> list[dict]:
    first = {
        "candidates": [{"content": {"parts": [{"text": 'He said "hi\\" [ok] {'}], "role": "model"}, "index": 0}],
        "modelVersion": "gemini-2.5-flash",
        "responseId": "r1",
    }
    last = {
        **GEMINI_RESPONSE,
        "candidates": [
            {"content": {"parts": [{"text": " done"}], "role": "model"}, "finishReason": "STOP", "index": 0}
        ],
    }
    return [first, last]


def gemini_array_stream() -> bytes:
    return b"[" + b",\r\n".join(json.dumps(c).encode() for c in gemini_chunks()) + b"]"


def gemini_sse_stream() -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in gemini_chunks())


def test_gemini_streams_are_read_as_streams_with_or_without_sse() -> None:
    stream_path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert gemini.FAMILY.streams(stream_path, "application/json")
    assert gemini.FAMILY.streams(stream_path, "text/event-stream")
    assert not gemini.FAMILY.streams("/v1beta/models/gemini-2.5-flash:generateContent", "application/json")


@pytest.mark.parametrize(
    "content_type, stream", [("application/json", gemini_array_stream()), ("text/event-stream", gemini_sse_stream())]
)
def test_gemini_stream_fields(content_type: str, stream: bytes) -> None:
    parser = gemini.FAMILY.stream_parser(100, content_type)
    assert parser.feed(stream)
    parser.close()
    fields = parser.fields()
    assert fields["chunk_count"] == 2 and fields["output_tokens"] == 340 and fields["input_tokens"] == 120
    assert fields["response_id"] == "r1" and fields["finish_reasons"] == ("STOP",)
    assert fields["output_messages"][0]["content"] == 'He said "hi\\" [ok] { done'
    assert parser.done == (content_type == "application/json")  # the array's end; SSE ends with the body


@PROPERTY
@given(st.lists(st.integers(min_value=0, max_value=len(gemini_array_stream())), max_size=15))
def test_gemini_array_split_anywhere_reads_as_one_piece(cuts: list[int]) -> None:
    stream = gemini_array_stream()
    whole = gemini.FAMILY.stream_parser(100, "application/json")
    whole.feed(stream)
    split = gemini.FAMILY.stream_parser(100, "application/json")
    bounds = [0, *sorted(cuts), len(stream)]
    for a, b in zip(bounds, bounds[1:]):
        split.feed(stream[a:b])
    assert split.done and split.fields() == whole.fields()


@PROPERTY
@given(st.lists(st.integers(min_value=0, max_value=len(anthropic_stream())), max_size=15))
def test_anthropic_split_anywhere_reads_as_one_piece(cuts: list[int]) -> None:
    stream = anthropic_stream()
    whole = anthropic_messages.FAMILY.stream_parser(None, "text/event-stream")
    whole.feed(stream)
    split = anthropic_messages.FAMILY.stream_parser(None, "text/event-stream")
    bounds = [0, *sorted(cuts), len(stream)]
    for a, b in zip(bounds, bounds[1:]):
        split.feed(stream[a:b])
    assert split.done and split.fields() == whole.fields()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@PROPERTY
@given(JSON_VALUES, st.binary(max_size=200))
def test_wrong_types_and_garbage_never_raise(value, garbage: bytes) -> None:
    for family in (anthropic_messages.FAMILY, gemini.FAMILY):
        family.request_fields(value, "chat", "/v1beta/models/m:generateContent", "", 10)
        family.response_fields(value, 10)
        for content_type in ("text/event-stream", "application/json"):
            parser = family.stream_parser(10, content_type)
            parser.feed(garbage)
            parser.feed(b"data: " + json.dumps(value).encode() + b"\n\n")
            parser.close()
            parser.fields()
