"""The addon with mitmproxy's own test helpers: fail-open behaviour and what it never changes."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import taddons, tflow, tutils

from llmtap.capture.addon import LLMTap, StreamTee
from llmtap.record import ExchangeRecord

CHAT = json.dumps({"model": "pulze", "messages": [{"role": "user", "content": "hello"}]}).encode()
ANSWER = json.dumps(
    {
        "id": "r1",
        "object": "chat.completion",
        "model": "openai/gpt-4o",
        "created": 1701483003546,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        "metadata": {"costs": {"prompt_tokens": 0.1, "completion_tokens": 0.2, "total_tokens": 0.3}},
    }
).encode()


class ListSink:
    name = "list"

    def __init__(self) -> None:
        self.records: list[ExchangeRecord] = []

    def emit(self, record: ExchangeRecord) -> None:
        self.records.append(record)

    def flush(self, timeout: float = 10.0) -> None: ...

    def close(self) -> None: ...


class BrokenSink(ListSink):
    name = "broken"

    def emit(self, record: ExchangeRecord) -> None:
        raise RuntimeError("disk on fire")


def chat_flow(body: bytes = ANSWER, status: int = 200, content_type: str = "application/json"):
    flow = tflow.tflow(
        req=tutils.treq(
            method=b"POST",
            path=b"/v1/chat/completions",
            content=CHAT,
            headers=((b"authorization", b"Bearer sk-secret"),),
        )
    )
    flow.response = tutils.tresp(status_code=status, content=body, headers=((b"content-type", content_type.encode()),))
    return flow


@pytest.fixture
def tap():
    addon = LLMTap()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, llmtap_db="", llmtap_metrics_port=-1)
        yield addon


def run_flow(addon: LLMTap, flow) -> None:
    addon.request(flow)
    addon.responseheaders(flow)
    addon.response(flow)


def test_a_raising_sink_touches_neither_the_flow_nor_other_sinks(tap) -> None:
    good = ListSink()
    tap.sinks = [BrokenSink(), good]
    flow = chat_flow()
    before = (flow.request.get_state(), flow.response.get_state())
    run_flow(tap, flow)
    assert (flow.request.get_state(), flow.response.get_state()) == before
    [record] = good.records
    assert record.cost_usd == 0.3 and record.cost_source == "reported"
    assert tap.health.internal_errors["broken"] == 1
    assert tap.health.in_flight == 0


@pytest.mark.parametrize("body", [b"not json at all", b'{"truncated": ', b"\xff\xfe\x00", b"[" * 100_000])
def test_malformed_success_bodies_are_counted_and_still_recorded(tap, body) -> None:
    sink = ListSink()
    tap.sinks = [sink]
    flow = chat_flow(body)
    run_flow(tap, flow)
    assert flow.response.content == body
    [record] = sink.records
    assert record.http_status == 200 and record.cost_source == "unknown" and record.cost_usd is None
    assert tap.health.internal_errors["parse_response"] == 1


def test_record_is_emitted_exactly_once(tap) -> None:
    sink = ListSink()
    tap.sinks = [sink]
    flow = chat_flow()
    run_flow(tap, flow)
    flow.error = tflow.terr()
    tap.error(flow)
    assert len(sink.records) == 1


def test_requests_are_not_changed_unless_propagate_is_on(tap) -> None:
    flow = chat_flow()
    tap.request(flow)
    assert "traceparent" not in flow.request.headers
    with taddons.context(tap) as tctx:
        tctx.configure(tap, llmtap_propagate=True)
        flow = chat_flow()
        flow.request.headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        tap.request(flow)
        exchange = flow.metadata["llmtap"]
        assert (
            flow.request.headers["traceparent"]
            == f"00-0af7651916cd43dd8448eb211c80319c-{exchange.fields['span_id']}-01"
        )
        assert exchange.fields["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_other_endpoints_are_not_recorded(tap) -> None:
    sink = ListSink()
    tap.sinks = [sink]
    flow = tflow.tflow(resp=True)
    run_flow(tap, flow)
    assert sink.records == [] and "llmtap" not in flow.metadata


def test_stream_tee_forwards_garbage_untouched(tap) -> None:
    sink = ListSink()
    tap.sinks = [sink]
    flow = chat_flow(b"", content_type="text/event-stream")
    flow.response.headers["content-encoding"] = "gzip"  # but the bytes are not gzip
    tap.request(flow)
    tap.responseheaders(flow)
    tee = flow.response.stream
    assert isinstance(tee, StreamTee)
    chunks = [b'data: {"a"', b"\x00\xff garbage", b""]
    assert [tee(c) for c in chunks] == chunks
    tap.response(flow)
    [record] = sink.records
    assert record.stream and record.chunk_count == 0
    assert tap.health.internal_errors["parse_stream"] == 1


def test_unsupported_encoding_streams_untouched(tap) -> None:
    sink = ListSink()
    tap.sinks = [sink]
    flow = chat_flow(b"", content_type="text/event-stream")
    flow.response.headers["content-encoding"] = "compress"
    tap.request(flow)
    tap.responseheaders(flow)
    assert flow.response.stream(b"data: x\n\n") == b"data: x\n\n"
    tap.response(flow)
    assert sink.records[0].stream
    assert tap.health.internal_errors["parse_response"] == 1


def test_api_key_only_as_fingerprint(tap) -> None:
    sink = ListSink()
    tap.sinks = [sink]
    run_flow(tap, chat_flow())
    text = sink.records[0].to_json()
    assert "sk-secret" not in text and sink.records[0].key_fingerprint.startswith("fp_")


def test_stream_record_is_emitted_at_done_before_that_chunk_is_released(tap) -> None:
    """The openai SDK stops reading at [DONE]: the record must exist by then."""
    sink = ListSink()
    tap.sinks = [sink]
    flow = chat_flow(b"", content_type="text/event-stream")
    tap.request(flow)
    tap.responseheaders(flow)
    tee = flow.response.stream
    event = {
        "id": "s1",
        "model": "openai/gpt-4o",
        "choices": [{"index": 0, "delta": {"content": "hi"}}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    }
    assert tee(b"data: " + json.dumps(event).encode() + b"\n\n") and sink.records == []
    tee(b"data: [DONE]\n\n")
    [record] = sink.records  # emitted inside the call that returns the [DONE] chunk
    assert record.output_tokens == 1 and record.chunk_count == 1 and record.error_type is None
    tee(b"")
    tap.response(flow)
    assert len(sink.records) == 1 and tap.health.in_flight == 0


def responses_flow(method: bytes, path: bytes, answer: dict, body: bytes = b""):
    flow = tflow.tflow(
        req=tutils.treq(method=method, path=path, content=body, headers=((b"authorization", b"Bearer sk-secret"),))
    )
    flow.response = tutils.tresp(content=json.dumps(answer).encode(), headers=((b"content-type", b"application/json"),))
    return flow


def test_background_response_billed_by_the_first_finished_poll_only(tap, monkeypatch) -> None:
    sink = ListSink()
    tap.sinks = [sink]
    usage = {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}
    queued = {"id": "resp_a", "object": "response", "status": "queued", "background": True, "usage": None}
    post = json.dumps({"model": "gpt-4o-mini", "input": "x", "background": True}).encode()
    run_flow(tap, responses_flow(b"POST", b"/v1/responses", queued, post))
    assert tap.pending == {"resp_a": "gpt-4o-mini"}
    run_flow(tap, responses_flow(b"GET", b"/v1/responses/resp_a", {**queued, "status": "in_progress"}))
    run_flow(tap, responses_flow(b"GET", b"/v1/responses/resp_a", {**queued, "status": "completed", "usage": usage}))
    run_flow(tap, responses_flow(b"GET", b"/v1/responses/resp_a", {**queued, "status": "completed", "usage": usage}))
    run_flow(tap, responses_flow(b"GET", b"/v1/responses/resp_other", {**queued, "status": "completed"}))
    assert [(r.method, r.response_status, r.input_tokens, r.cost_source) for r in sink.records] == [
        ("POST", "queued", None, "deferred"),
        ("GET", "completed", 5, "database"),
    ]
    assert sink.records[1].request_model == "gpt-4o-mini" and not tap.pending

    monkeypatch.setattr("llmtap.capture.addon.PENDING_LIMIT", 3)  # bounded: the oldest id is forgotten
    for n in range(5):
        run_flow(tap, responses_flow(b"POST", b"/v1/responses", {**queued, "id": f"resp_{n}"}, post))
    assert list(tap.pending) == ["resp_2", "resp_3", "resp_4"]
