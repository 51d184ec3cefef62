"""Protocol parsers, field by field, on bodies shaped like the Pulze reference (no proxy)."""

from __future__ import annotations

import json

import pytest

from llmtap.capture.headers import key_fingerprint
from llmtap.pricing.cost import Pricer, resolve_cost
from llmtap.protocols import chat_completions, pulze
from llmtap.protocols.chat_completions import StreamAccumulator, operation_for, request_fields
from llmtap.protocols.errors import error_message
from llmtap.protocols.providers import provider_from
from llmtap.protocols.values import load_json


def response_fields(body, content_cap):
    """A Chat Completions body as the finishing step reads it: the family's fields, then Pulze's overlay."""
    fields = chat_completions.response_fields(body, content_cap)
    if isinstance(body, dict) and pulze.OVERLAY.applies(None, body):
        fields.update(pulze.OVERLAY.response_fields(body, content_cap is not None))
    return fields


def stream_fields(acc: StreamAccumulator) -> dict:
    """A stream's fields with Pulze's overlay applied to what the stream carried (no content kept)."""
    fields = acc.fields()
    if pulze.OVERLAY.applies(None, acc.overlay_body()):
        fields.update(pulze.OVERLAY.response_fields(acc.overlay_body(), False))
    return fields


# The request example of shared/reference/pulze-v1-completions.txt, with concrete values.
REFERENCE_REQUEST = {
    "model": "pulze",
    "max_tokens": 123,
    "temperature": 0.5,
    "top_p": 0.9,
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "d",
                "parameters": {"type": "object", "properties": {}, "required": ["city"]},
            },
        },
        {"type": "function", "function": {"name": "get_time"}},
    ],
    "tool_choice": "none",
    "n": 2,
    "stream": True,
    "logprobs": 2,
    "stop": "END",
    "presence_penalty": 0,
    "frequency_penalty": 0.5,
    "best_of": 2,
    "logit_bias": {"50256": -100},
    "response_format": {"type": "text"},
    "prompt": "Say something nice",
}

# The response example of the reference, with concrete values (created in milliseconds!).
REFERENCE_RESPONSE = {
    "choices": [
        {"index": 0, "finish_reason": "stop", "text": "Hello there", "logprobs": None},
        {"index": 1, "finish_reason": "length", "text": "Hi", "logprobs": None},
    ],
    "created": 1701483003546,
    "metadata": {
        "app_id": "app-123",
        "model": {
            "model": "gpt-4o-mini",
            "provider": "openai",
            "owner": "openai",
            "namespace": "openai/gpt-4o-mini",
            "at": "2024-07-18",
        },
        "costs": {"total_tokens": 0.00066, "prompt_tokens": 0.00016, "completion_tokens": 0.0005},
        "cost_savings": {"total_tokens": 0.002, "prompt_tokens": 0.0015, "completion_tokens": 0.0005},
        "generated_artifacts": {"items": [{}]},
        "search_results": {"items": [{}]},
        "latency": 0.601,
        "labels": {"team": "search", "weights_cost": "0.5"},
        "error": None,
        "scores": {
            "best_models": [{"openai/gpt-4o-mini": 0.93}],
            "candidates": [{"openai/gpt-4o-mini": 0.93}, {"anthropic/claude-3-haiku": 0.9}],
        },
        "score": 0.93,
        "temperature": 0.5,
        "max_tokens": 123,
        "status_code": 200,
        "retries": 1,
        "extra": {},
        "warning": "fell back once",
        "category": "general",
    },
    "id": "pulze-req-1",
    "usage": {"total_tokens": 33, "prompt_tokens": 12, "completion_tokens": 21},
    "model": "openai/gpt-4o-mini",
    "object": "text_completion",
}


@pytest.mark.parametrize(
    "method, path, expected",
    [
        ("POST", "/v1/chat/completions", "chat"),
        ("POST", "/v1/completions", "text_completion"),
        ("POST", "/v1/completions?x=1", "text_completion"),
        ("POST", "/openai/v1/chat/completions/", "chat"),
        ("GET", "/v1/completions", None),
        ("POST", "/v1/models/rank", None),
        ("POST", "/v1/embeddings", None),
        ("POST", "/v1/logs", None),
    ],
)
def test_operation_for(method: str, path: str, expected: str | None) -> None:
    assert operation_for(method, path) == expected


def test_request_fields_follow_the_reference() -> None:
    fields = request_fields(REFERENCE_REQUEST, "text_completion", None)
    assert fields == {
        "request_model": "pulze",
        "max_tokens": 123,
        "temperature": 0.5,
        "top_p": 0.9,
        "n": 2,
        "best_of": 2,
        "stop": ("END",),
        "presence_penalty": 0.0,
        "frequency_penalty": 0.5,
        "logprobs": 2,
        "seed": None,
        "tool_count": 2,
        "tool_names": ("get_weather", "get_time"),
        "tool_choice": "none",
        "response_format": "text",
        "logit_bias": True,
        "stream": True,
    }
    assert "input_messages" not in fields  # no capture unless opted in


def test_request_nulls_and_missing_optional_fields() -> None:
    nulls = {k: None for k in REFERENCE_REQUEST} | {"prompt": "x"}
    fields = request_fields(nulls, "text_completion", None)
    assert fields["stream"] is False
    assert all(v is None for k, v in fields.items() if k != "stream")
    assert request_fields({"prompt": "x"}, "text_completion", None)["request_model"] is None


@pytest.mark.parametrize(
    "body", [None, [], "text", 42, {"model": 7, "temperature": "hot", "n": True, "stop": [1, "a"]}]
)
def test_request_wrong_types_never_raise(body) -> None:
    fields = request_fields(body, "chat", None)
    if fields:
        assert fields["request_model"] is None and fields["temperature"] is None and fields["stop"] == ("a",)


def test_request_content_only_when_opted_in_and_capped() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "x" * 50}]},
        ]
    }
    assert "input_messages" not in request_fields(body, "chat", None)
    messages = request_fields(body, "chat", 10)["input_messages"]
    # one budget for the whole prompt: 8 characters of system message leave 2 for the user's
    assert messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "xx", "truncated": True})


def test_response_fields_follow_the_reference() -> None:
    fields = response_fields(REFERENCE_RESPONSE, None)
    expected = {
        "response_id": "pulze-req-1",
        "response_object": "text_completion",
        "created_at": 1701483003.546,  # milliseconds converted to epoch seconds
        "response_model": "openai/gpt-4o-mini",
        "input_tokens": 12,
        "output_tokens": 21,
        "total_tokens": 33,
        "cached_input_tokens": None,
        "reasoning_tokens": None,
        "app_id": "app-123",
        "served_model": "gpt-4o-mini",
        "served_provider": "openai",
        "served_owner": "openai",
        "served_namespace": "openai/gpt-4o-mini",
        "served_at": "2024-07-18",
        "cost_prompt_usd": 0.00016,
        "cost_completion_usd": 0.0005,
        "reported_cost_usd": 0.00066,
        "cost_savings_prompt_usd": 0.0015,
        "cost_savings_completion_usd": 0.0005,
        "cost_savings_usd": 0.002,
        "upstream_latency_s": 0.601,
        "retries": 1,
        "upstream_status_code": 200,
        "score": 0.93,
        "best_model": "openai/gpt-4o-mini",
        "candidate_count": 2,
        "response_labels": {"team": "search", "weights_cost": "0.5"},
        "warning": "fell back once",
        "upstream_error": None,
        "category": "general",
        "choice_count": 2,
        "finish_reasons": ("stop", "length"),
        # generated_artifacts / search_results are content: kept only when capture is on
        "metadata": {
            k: v
            for k, v in REFERENCE_RESPONSE["metadata"].items()
            if k not in ("generated_artifacts", "search_results")
        },
    }
    assert fields == expected
    assert response_fields(REFERENCE_RESPONSE, 100)["metadata"] == REFERENCE_RESPONSE["metadata"]


def test_response_with_null_metadata_parts() -> None:
    body = dict(REFERENCE_RESPONSE, created=0, usage=None)
    body["metadata"] = {k: None for k in REFERENCE_RESPONSE["metadata"]} | {"model": {"model": "m", "namespace": "p/m"}}
    fields = response_fields(body, None)
    assert fields["created_at"] is None
    assert fields["input_tokens"] is None and fields["reported_cost_usd"] is None
    assert fields["served_namespace"] == "p/m" and fields["served_provider"] is None
    assert fields["retries"] is None and fields["candidate_count"] is None


def test_openai_response_without_metadata_and_seconds_timestamp() -> None:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1701483003,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": 1000,
            "completion_tokens": 10,
            "total_tokens": 1010,
            "prompt_tokens_details": {"cached_tokens": 400},
            "completion_tokens_details": {"reasoning_tokens": 3},
        },
    }
    fields = response_fields(body, 100)
    assert fields["created_at"] == 1701483003
    assert fields["cached_input_tokens"] == 400 and fields["reasoning_tokens"] == 3
    assert fields["output_messages"] == ({"role": "assistant", "content": "ok", "finish_reason": "stop"},)
    assert "metadata" not in fields


def test_stream_accumulator_chat() -> None:
    acc = StreamAccumulator(None)
    events = [
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1701483003546,
            "model": "openai/gpt-4o",
            "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}],
        },
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo"}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]},
        {
            "id": "c1",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
            "metadata": REFERENCE_RESPONSE["metadata"],
        },
    ]
    carried = [acc.add(e) for e in events]
    assert carried == [False, True, True, True, False]
    fields = stream_fields(acc)
    assert fields["chunk_count"] == 3 and fields["choice_count"] == 1
    assert fields["finish_reasons"] == ("stop",)
    assert fields["input_tokens"] == 5 and fields["reported_cost_usd"] == 0.00066
    assert fields["created_at"] == 1701483003.546 and fields["response_id"] == "c1"
    assert "output_messages" not in fields


def test_stream_accumulator_completions_with_capture_and_no_usage() -> None:
    acc = StreamAccumulator(4)
    for text, reason in [("ab", None), ("cde", None), ("", "length")]:
        acc.add({"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": reason}]})
    acc.add("not an object")
    fields = acc.fields()
    assert fields["input_tokens"] is None and fields["chunk_count"] == 2
    assert fields["output_messages"] == (
        {"role": "assistant", "content": "abcd", "truncated": True, "finish_reason": "length"},
    )


@pytest.mark.parametrize(
    "body, raw, expected",
    [
        ({"error": {"message": "Rate limit", "type": "rate_limit"}}, None, "Rate limit"),
        (
            {
                "detail": [
                    {
                        "loc": ["body", "prompt"],
                        "msg": "field required",
                        "type": "missing",
                        "input": {"secret prompt": 1},
                    }
                ]
            },
            None,
            "body.prompt: field required",
        ),
        ({"detail": "Not found"}, None, "Not found"),
        (None, b"<html><head><title>500 Internal Server Error</title></head></html>", "500 Internal Server Error"),
        (None, b"upstream exploded\nstack...", "upstream exploded"),
        (None, b"", None),
    ],
)
def test_error_message_is_short_and_content_free(body, raw, expected) -> None:
    message = error_message(body, raw)
    assert message == expected
    assert "secret prompt" not in (message or "")


@pytest.mark.parametrize(
    "body, raw",
    [
        ({"error": {"message": "Incorrect API key provided: sk-proj-abc123XYZ***wxyz. Find your key at..."}}, None),
        ({"detail": "invalid key pulze_live_0123456789abcdef"}, None),
        (None, b"401 Unauthorized: Bearer sk-abcdefgh12345678 rejected"),
    ],
)
def test_error_messages_never_carry_credentials(body, raw) -> None:
    message = error_message(body, raw)
    assert "[redacted]" in message
    for fragment in ("abc123", "0123456789abcdef", "sk-abcdefgh"):
        assert fragment not in message


def test_pulze_headers() -> None:
    fields = pulze.header_fields(
        {
            "pulze-labels": '{"team": "Search", "n": 3}',
            "pulze-weights": '{"cost": 0.5, "quality": 0.3, "latency": 0.2}',
            "pulze-policies": "not json",
        }
    )
    assert fields == {
        "labels": {"team": "Search", "n": "3"},
        "weights": {"cost": 0.5, "quality": 0.3, "latency": 0.2},
        "policies": None,
    }
    assert pulze.header_fields({}) == {"labels": None, "weights": None, "policies": None}


@pytest.mark.parametrize(
    "host, namespace, model, expected",
    [
        ("api.pulze.ai", "anthropic/claude-3-haiku", "anthropic/claude-3-haiku", "anthropic"),
        ("api.pulze.ai", None, "openai/gpt-4o", "openai"),
        ("api.openai.com", None, "gpt-4o", "openai"),
        ("example.com", None, "gpt-4o", None),
    ],
)
def test_provider_from(host, namespace, model, expected) -> None:
    assert provider_from(host, namespace, model) == expected


def test_key_fingerprint_is_keyed_and_never_the_key() -> None:
    key = "sk-live-abcdef0123456789"
    fp = key_fingerprint({"authorization": f"Bearer {key}"}, "")
    assert fp.startswith("fp_") and len(fp) == 19 and key not in fp
    assert fp == key_fingerprint({"authorization": f"bearer {key}"}, "")
    assert fp != key_fingerprint({"authorization": f"Bearer {key}"}, "another-salt")
    assert key_fingerprint({"x-api-key": key}, "") == fp
    assert key_fingerprint({}, "") is None
    assert key_fingerprint({"x-goog-api-key": key}, "") == fp == key_fingerprint({"api-key": key}, "")
    assert key_fingerprint({}, "", f"alt=sse&key={key}") == fp
    assert key_fingerprint({}, "", "alt=sse&monkey=1") is None


PRICES = Pricer.load()  # the bundled genai-prices data (gpt-4o: 2.5 / cached 1.25 / 10 per 1M)


@pytest.mark.parametrize(
    "fields, expected",
    [
        # reported beats the price data, even when the model has a price
        (
            {"reported_cost_usd": 0.00066, "input_tokens": 10, "output_tokens": 10, "response_model": "gpt-4o"},
            {"cost_usd": 0.00066, "cost_nanousd": 660_000, "cost_source": "reported"},
        ),
        # reported zero is a real zero
        ({"reported_cost_usd": 0.0}, {"cost_usd": 0.0, "cost_nanousd": 0, "cost_source": "reported"}),
        # priced from the database, with cached input at its own rate and dated model names
        (
            {
                "input_tokens": 1000,
                "output_tokens": 100,
                "cached_input_tokens": 400,
                "response_model": "gpt-4o-2024-08-06",
            },
            {
                "cost_usd": (600 * 2.5 + 400 * 1.25 + 100 * 10.0) / 1e6,
                "cost_prompt_usd": (600 * 2.5 + 400 * 1.25) / 1e6,
                "cost_completion_usd": 100 * 10.0 / 1e6,
                "cost_source": "database",
                "price_model": "openai/gpt-4o",
            },
        ),
        # the database's own matching; a provider prefix names the provider
        (
            {"input_tokens": 1_000_000, "output_tokens": 0, "served_namespace": "openai/gpt-4o-mini"},
            {
                "cost_usd": 0.15,
                "cost_prompt_usd": 0.15,
                "cost_completion_usd": 0.0,
                "cost_source": "database",
                "price_model": "openai/gpt-4o-mini",
            },
        ),
        # unknown model: unknown, never $0
        (
            {"input_tokens": 10, "output_tokens": 10, "response_model": "acme/secret-model"},
            {"cost_usd": None, "cost_nanousd": None, "cost_source": "unknown"},
        ),
        # no token counts (a stream without usage): unknown
        ({"response_model": "gpt-4o"}, {"cost_usd": None, "cost_source": "unknown"}),
    ],
)
def test_resolve_cost(fields, expected) -> None:
    got = resolve_cost({"request_start": 1.7e9, **fields}, PRICES)
    assert {key: got.get(key) for key in expected} == pytest.approx(expected)
    if got["cost_usd"] is not None:  # exact: the float is the nano-dollar amount, no noise
        assert got["cost_usd"] == got["cost_nanousd"] / 1e9


def test_price_file_overrides_the_database(tmp_path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"gpt-4o": {"input": 1, "output": 2}, "acme/new": {"input": 3, "output": 4}}))
    pricer = Pricer.load(str(path))
    fields = {"request_start": 1.7e9, "input_tokens": 1_000_000, "output_tokens": 1_000_000}
    assert resolve_cost({**fields, "response_model": "gpt-4o"}, pricer)["cost_usd"] == 3.0
    assert resolve_cost({**fields, "response_model": "acme/new"}, pricer)["cost_usd"] == 7.0
    assert resolve_cost({**fields, "response_model": "gpt-4o-mini"}, pricer)["cost_source"] == "database"  # stays


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": 1}',
        b'{"a": 1}\n',
        b'{"a": 1} x',
        b'{"a": 1}{}',
        b' {"a": 1}',
        b'\xef\xbb\xbf{"a": 1}',
        '{"a": 1}'.encode("utf-16-le"),
        '{"a": 1}'.encode("utf-32"),
        b'{"a": "\xed\xa0\x80"}',
        b'{"a": "\xff"}',
        b'{"a": NaN}',
        b"[1, 2]",
        b'"text"',
        b"{",
        b"{" * 100_000,
        b"",
    ],
)
def test_load_json_follows_json_loads_exactly(body) -> None:
    try:
        expected = json.loads(body) if body else None
    except (ValueError, RecursionError):
        expected = None
    assert repr(load_json(body)) == repr(expected)
