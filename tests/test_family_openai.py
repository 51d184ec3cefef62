"""OpenAI Responses, embeddings, Azure OpenAI and OpenRouter parsers: tables, bad input, properties."""

from __future__ import annotations

import base64
import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_families import (
    EMBEDDINGS_RESPONSE,
    OPENROUTER_BYOK,
    RESPONSES_REQUEST,
    RESPONSES_RESPONSE,
    RESPONSES_STREAM,
    typed_sse,
)

from llmtap.config import Settings, SettingsError
from llmtap.protocols import azure_openai, embeddings, openai_responses, openrouter, registry

PROPERTY = settings(derandomize=True, deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


def stream_fields(data: bytes, family=openai_responses.FAMILY, cap: int | None = None):
    parser = family.stream_parser(cap, "text/event-stream")
    parser.feed(data)
    parser.close()
    return parser, parser.fields()


# --- OpenAI Responses ------------------------------------------------------------------------------


def test_responses_request_fields() -> None:
    fields = openai_responses.request_fields({**RESPONSES_REQUEST, "conversation": {"id": "conv_1"}}, 100)
    assert fields["request_model"] == "o4-mini" and fields["max_tokens"] == 256
    assert (fields["temperature"], fields["top_p"]) == (0.5, 0.9)
    assert (fields["tool_count"], fields["tool_types"], fields["tool_names"]) == (
        2,
        ("function", "web_search"),
        ("get_weather",),
    )
    assert (fields["previous_response_id"], fields["conversation_id"]) == ("resp_prev", "conv_1")
    assert fields["stream"] is True and fields["background"] is None and fields["tool_choice"] == "auto"
    assert [m["role"] for m in fields["input_messages"]] == ["system", "user"]
    assert fields["input_messages"][1]["content"] == "Hello"


def test_responses_response_fields_follow_the_reference() -> None:
    fields = openai_responses.response_fields(RESPONSES_RESPONSE, None)
    assert fields == {
        "response_id": "resp_1",
        "response_object": "response",
        "response_status": "completed",
        "created_at": 1741476542.0,
        "response_model": "o4-mini-2025-04-16",
        "input_tokens": 40,
        "output_tokens": 30,
        "total_tokens": 70,
        "cached_input_tokens": 16,
        "cache_write_input_tokens": 0,
        "service_tier": None,
        "reasoning_tokens": 20,
        "finish_reasons": ("completed",),
        "choice_count": 1,
    }


def test_responses_incomplete_and_failed() -> None:
    incomplete = {**RESPONSES_RESPONSE, "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
    assert openai_responses.response_fields(incomplete, None)["finish_reasons"] == ("max_output_tokens",)
    failed = {
        **RESPONSES_RESPONSE,
        "status": "failed",
        "usage": None,
        "error": {"code": "x", "message": "boom sk-abcdefghijk"},
    }
    fields = openai_responses.response_fields(failed, None)
    assert fields["error_type"] == "response_failed" and fields["error_message"] == "boom [redacted]"
    assert fields["input_tokens"] is None


def test_responses_stream_reads_events_and_ignores_unknown_ones() -> None:
    parser, fields = stream_fields(RESPONSES_STREAM, cap=100)
    assert parser.done and parser.problem is None
    assert fields["chunk_count"] == 2 and fields["input_tokens"] == 40 and fields["reasoning_tokens"] == 20
    assert fields["output_messages"][0]["content"] == "Hi there"
    assert parser.overlay_body()["id"] == "resp_1"


def test_responses_stream_done_at_the_terminal_event_before_the_stream_ends() -> None:
    parser = openai_responses.FAMILY.stream_parser(None, "text/event-stream")
    head, tail = RESPONSES_STREAM.rsplit(b"event: response.completed", 1)
    parser.feed(head)
    assert not parser.done
    parser.feed(b"event: response.completed" + tail)
    assert parser.done


def test_responses_stream_error_event_and_truncation() -> None:
    error = typed_sse([{"type": "error", "code": "server_error", "message": "Overloaded", "sequence_number": 1}])
    parser, fields = stream_fields(RESPONSES_STREAM.split(b"event: response.completed")[0] + error)
    assert parser.done and fields["error_type"] == "stream_error" and fields["error_message"] == "Overloaded"
    truncated, fields = stream_fields(RESPONSES_STREAM[: len(RESPONSES_STREAM) // 2])
    assert not truncated.done and truncated.problem  # a cut event, or no terminal event
    assert fields["input_tokens"] is None and fields["response_id"] == "resp_1"  # the envelope still counts
    cut, _ = stream_fields(RESPONSES_STREAM.split(b"event: response.completed")[0])
    assert cut.problem == "stream ended before its terminal event"


@pytest.mark.parametrize(
    "event",
    [
        b"data: [1, 2]\n\n",
        b'data: {"type": "response.completed", "response": 7}\n\n',
        b"data: not json\n\n",
    ],
)
def test_responses_stream_wrong_types_are_a_problem_not_an_exception(event: bytes) -> None:
    parser, fields = stream_fields(event)
    assert parser.problem
    assert fields["input_tokens"] is None


@pytest.mark.parametrize(
    "method, path, expected",
    [
        ("POST", "/v1/responses", "chat"),
        ("GET", "/v1/responses/resp_123", "chat"),
        ("GET", "/v1/responses/resp_123/input_items", None),
        ("POST", "/v1/responses/resp_123/cancel", None),
        ("DELETE", "/v1/responses/resp_123", None),
        ("GET", "/v1/responses", None),
    ],
)
def test_responses_operation_and_poll(method, path, expected) -> None:
    assert openai_responses.operation_for(method, path) == expected
    assert (openai_responses.poll_id_of(method, path) is not None) == (method == "GET" and expected is not None)


@PROPERTY
@given(st.lists(st.integers(min_value=0, max_value=len(RESPONSES_STREAM)), max_size=10))
def test_responses_stream_split_anywhere_reads_as_one_piece(cuts: list[int]) -> None:
    _, whole = stream_fields(RESPONSES_STREAM)
    bounds = [0, *sorted(cuts), len(RESPONSES_STREAM)]
    parser = openai_responses.FAMILY.stream_parser(None, "text/event-stream")
    carried = [parser.feed(RESPONSES_STREAM[a:b]) for a, b in zip(bounds, bounds[1:])]
    parser.close()
    assert parser.fields() == whole and carried.count(True) >= 1


@PROPERTY
@given(
    st.lists(st.binary(max_size=64) | st.sampled_from([b"data: ", b"\n\n", b"event: error\n", b"{", b"}"]), max_size=20)
)
def test_responses_stream_garbage_never_raises(pieces: list[bytes]) -> None:
    parser = openai_responses.FAMILY.stream_parser(32, "text/event-stream")
    for piece in pieces:
        parser.feed(piece)
    parser.close()
    assert isinstance(parser.fields(), dict)


@PROPERTY
@given(JSON_VALUES)
def test_responses_and_embeddings_wrong_types_never_raise(value) -> None:
    for body in (value, {"usage": value, "output": value, "status": value, "tools": value, "input": value}):
        openai_responses.request_fields(body, 10)
        openai_responses.response_fields(body, 10)
        embeddings.request_fields(body, 10)
        embeddings.response_fields(body, 10)
        openrouter.cost_of(body if isinstance(body, dict) else {})


# --- embeddings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, count",
    [("a", 1), (["a", "b"], 2), ([1, 2, 3], 1), ([[1, 2], [3]], 2), ([], 0), (7, None), (True, None)],
)
def test_embeddings_input_count(value, count) -> None:
    assert embeddings.input_count(value) == count


@pytest.mark.parametrize("size", [1, 2, 3, 7, 256, 1536])
def test_embeddings_dimensions_of_base64_vectors(size: int) -> None:
    vector = base64.b64encode(struct.pack(f"<{size}f", *([0.25] * size))).decode()
    assert embeddings.dimensions_of(vector) == size
    assert embeddings.dimensions_of([0.1] * size) == size


def test_embeddings_priced_at_the_input_rate_when_the_provider_is_known() -> None:
    from llmtap.pricing.cost import Pricer, resolve_cost

    fields = {"response_model": "text-embedding-3-small", "input_tokens": 10**6, "output_tokens": 0}
    priced = resolve_cost({**fields, "provider": "openai", "request_start": 1.8e9}, Pricer.load())
    assert priced["cost_source"] == "database" and priced["cost_usd"] == pytest.approx(0.02)
    assert resolve_cost({**fields, "provider": None}, Pricer.load())["cost_usd"] is None


def test_embeddings_response_fields() -> None:
    fields = embeddings.response_fields(EMBEDDINGS_RESPONSE, None)
    assert (fields["input_tokens"], fields["output_tokens"], fields["dimensions"], fields["choice_count"]) == (
        3,
        0,
        3,
        2,
    )
    assert embeddings.response_fields({"data": []}, None)["output_tokens"] is None  # no usage: unknown, not 0


# --- Azure OpenAI ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, host, expected",
    [
        ("POST", "/openai/deployments/d1/chat/completions", "x.openai.azure.com", "chat"),
        ("POST", "/openai/deployments/d1/completions", "127.0.0.1", "text_completion"),
        ("POST", "/openai/deployments/d1/embeddings", "127.0.0.1", "embeddings"),
        ("POST", "/openai/v1/responses", "x.openai.azure.com", "chat"),
        ("GET", "/openai/v1/responses/resp_1", "x.openai.azure.com", "chat"),
        ("POST", "/openai/v1/chat/completions", "api.groq.com", None),  # Groq's path, not Azure
        ("POST", "/v1/chat/completions", "api.openai.com", None),
    ],
)
def test_azure_paths(method, path, host, expected) -> None:
    assert azure_openai.FAMILY.operation(method, path, host) == expected


def test_azure_deployment_is_the_model_when_the_body_has_none() -> None:
    family = azure_openai.FAMILY
    path = "/openai/deployments/prod-chat/chat/completions"
    assert family.request_fields({"messages": []}, "chat", path, "api-version=1", None)["request_model"] == "prod-chat"
    assert family.request_fields({"model": "m"}, "chat", path, "", None)["request_model"] == "m"
    versioned = family.request_fields({}, "chat", path, "x=1&api-version=2024-10-21", None)
    assert versioned["api_version"] == "2024-10-21"
    emb = family.request_fields({"input": ["a", "b"]}, "embeddings", "/openai/deployments/e/embeddings", "", None)
    assert (emb["request_model"], emb["input_count"]) == ("e", 2)
    assert family.response_fields(EMBEDDINGS_RESPONSE, None)["dimensions"] == 3
    assert family.response_fields(RESPONSES_RESPONSE, None)["response_status"] == "completed"


def test_azure_stream_picks_the_shape_from_the_first_event() -> None:
    parser, fields = stream_fields(RESPONSES_STREAM, azure_openai.FAMILY)
    assert parser.done and fields["input_tokens"] == 40
    chat = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"x"}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\ndata: [DONE]\n\n'
    parser, fields = stream_fields(chat, azure_openai.FAMILY)
    assert parser.done and fields["input_tokens"] == 3 and fields["chunk_count"] == 1


# --- OpenRouter -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "usage, cost",
    [
        ({"cost": 0.5, "is_byok": False}, 0.5),
        ({"cost": 0.001, "is_byok": True, "cost_details": {"upstream_inference_cost": 0.02}}, 0.021),
        (
            {"cost": 0.001, "is_byok": True, "cost_details": {"upstream_inference_cost": None}},
            None,
        ),  # never the fee alone
        ({"cost": "free", "is_byok": False}, None),
        ({"is_byok": False}, None),
    ],
)
def test_openrouter_cost(usage, cost) -> None:
    assert openrouter.cost_of(usage) == pytest.approx(cost) if cost is not None else openrouter.cost_of(usage) is None


def test_openrouter_overlay_applies_by_host_or_usage_and_finish_names_the_router() -> None:
    family = registry.find("POST", "/api/v1/chat/completions", "openrouter.ai")[0]
    fields = {"upstream_host": "127.0.0.1", **family.response_fields(OPENROUTER_BYOK, None)}
    registry.finish(fields, family, OPENROUTER_BYOK, False)
    assert fields["router"] == "openrouter" and fields["provider"] == "openai"
    assert fields["reported_cost_usd"] == pytest.approx(0.021)
    plain = {"upstream_host": "api.openai.com"}
    registry.finish(plain, family, {"usage": {"prompt_tokens": 1}}, False)
    assert plain["router"] is None


def test_pulze_overlay_does_not_read_a_responses_metadata_object() -> None:
    family = openai_responses.FAMILY
    body = {**RESPONSES_RESPONSE, "metadata": {"costs": {"total_tokens": 5}}}
    fields = {"upstream_host": "127.0.0.1"}
    registry.finish(fields, family, body, False)
    assert fields["router"] is None and "reported_cost_usd" not in fields


# --- family_map -------------------------------------------------------------------------------------


def test_family_map_by_host_and_path_prefix() -> None:
    mapping = registry.family_map(("llm.corp.example=azure_openai", "/gw/embed=embeddings"))
    found = registry.find("POST", "/openai/v1/chat/completions", "llm.corp.example", mapping)
    assert found[0].name == "azure_openai"
    assert registry.find("POST", "/gw/embed/v1/embeddings", "x", mapping)[0].name == "embeddings"
    assert registry.find("POST", "/gw/embed/v1/chat/completions", "x", mapping) is None  # mapped: that family alone
    assert registry.find("POST", "/v1/chat/completions", "x", mapping)[0].name == "chat_completions"
    with pytest.raises(ValueError, match="not one of"):
        registry.family_map(("host=nonsense",))


def test_family_map_setting_syntax() -> None:
    assert Settings.from_values({"family_map": ["a=b"]}).family_map == ("a=b",)
    with pytest.raises(SettingsError, match="family_map"):
        Settings.from_values({"family_map": ["no-equals-sign"]})
    assert json.loads(Settings(family_map=("h=embeddings",)).to_json())["family_map"] == ["h=embeddings"]
