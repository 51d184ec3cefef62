"""OTLP spans on the wire: hand-built records through ``SpanSink``, then the real proxy.

Every span is decoded by a real OTLP receiver on loopback (``tests/otlp_receiver.py``).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from conftest import API_KEY, free_port, start_tap, wait_until
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from otlp_receiver import OTLPGRPCReceiver, OTLPHTTPReceiver, ReceivedSpan

from llmtap.config import Settings
from llmtap.health import Health
from llmtap.record import ExchangeRecord
from llmtap.sinks.spans import SpanSink
from llmtap.tracing import provider_name

pytestmark = pytest.mark.timeout(60)

_ids = itertools.count(1)
T0 = 1_717_000_000.123456
PROMPT = "zebra-quokka-7731 tell me about the marmalade lighthouse"
TRACEPARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT_PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACEPARENT_TRACE}-{TRACEPARENT_PARENT}-01"
MS = 1_000_000  # nanoseconds


@pytest.fixture(autouse=True)
def no_ambient_otel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: the machine's own OTEL_* variables must not leak in."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def receiver() -> Iterator[OTLPHTTPReceiver]:
    with OTLPHTTPReceiver() as r:
        yield r


def record(**fields) -> ExchangeRecord:
    """A complete, successful non-streamed Pulze chat exchange unless ``fields`` say otherwise."""
    n = next(_ids)
    base = dict(
        exchange_id=f"x{n}",
        operation="chat",
        method="POST",
        path="/v1/chat/completions",
        request_start=T0,
        request_end=T0 + 0.002,
        response_start=T0 + 0.4,
        response_end=T0 + 0.731,
        upstream_latency_s=0.601,
        upstream_scheme="https",
        upstream_host="api.pulze.ai",
        upstream_port=443,
        router="pulze",
        provider="mistralai",
        http_status=200,
        key_fingerprint="fp_0123456789abcdef",
        app_id="app-42",
        labels={"team": "search", "env": "prod"},
        trace_id=f"{n:032x}",
        span_id=f"{n + 0xABC:016x}",
        request_model="pulze",
        max_tokens=64,
        temperature=0.2,
        top_p=0.9,
        n=2,
        stop=("END", "\n\n"),
        presence_penalty=0.1,
        frequency_penalty=0.3,
        seed=7,
        response_format="json_object",
        response_id="chatcmpl-1",
        response_model="mistralai/mistral-small",
        served_namespace="mistralai/mistral-small",
        input_tokens=12,
        output_tokens=21,
        total_tokens=33,
        cached_input_tokens=4,
        reasoning_tokens=5,
        finish_reasons=("stop", "length"),
        cost_usd=0.00066,
        cost_source="reported",
        cost_savings_usd=0.0123,
        retries=1,
        score=0.87,
        warning="fell back to a cheaper model",
        input_messages=({"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}),
        output_messages=({"role": "assistant", "content": "the lighthouse", "finish_reason": "stop"},),
    )
    return ExchangeRecord(**{**base, **fields})


def export(receiver: OTLPHTTPReceiver, *records: ExchangeRecord, **settings) -> tuple[list[ReceivedSpan], Health]:
    """Emit ``records`` through a SpanSink aimed at ``receiver``; close it; return what arrived."""
    health = Health()
    sink = SpanSink(Settings(otlp_endpoint=receiver.traces_url, **settings), health)
    for r in records:
        sink.emit(r)
    sink.close()
    return receiver.wait_spans(len(records)), health


# --- unit level: hand-built records ---------------------------------------------------------


def test_every_attribute_identity_and_timing(receiver: OTLPHTTPReceiver) -> None:
    rec = record()
    [span], health = export(receiver, rec)
    assert span.name == "chat pulze"
    assert span.kind == Span.SPAN_KIND_CLIENT
    assert (span.trace_id, span.span_id, span.parent_span_id) == (rec.trace_id, rec.span_id, "")
    assert abs(span.start_ns - rec.request_start * 1e9) < MS
    assert abs(span.end_ns - rec.response_end * 1e9) < MS
    assert abs((span.end_ns - span.start_ns) / 1e9 - rec.duration_s) < 1e-3
    assert span.status_code == Status.STATUS_CODE_UNSET
    assert span.resource["service.name"] == "llmtap"
    assert span.scope == "llmtap"
    assert span.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "mistral_ai",
        "gen_ai.request.model": "pulze",
        "gen_ai.request.max_tokens": 64,
        "gen_ai.request.temperature": 0.2,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.request.frequency_penalty": 0.3,
        "gen_ai.request.presence_penalty": 0.1,
        "gen_ai.request.stop_sequences": ["END", "\n\n"],
        "gen_ai.request.choice.count": 2,
        "gen_ai.request.seed": 7,
        "gen_ai.request.stream": False,
        "gen_ai.output.type": "json",
        "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.response.model": "mistralai/mistral-small",
        "gen_ai.response.finish_reasons": ["stop", "length"],
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 21,
        "gen_ai.usage.cache_read.input_tokens": 4,
        "gen_ai.usage.reasoning.output_tokens": 5,
        "server.address": "api.pulze.ai",
        "server.port": 443,
        "pulze.cost_usd": 0.00066,
        "pulze.cost_source": "reported",
        "pulze.cost_savings_usd": 0.0123,
        "pulze.retries": 1,
        "pulze.score": 0.87,
        "pulze.app_id": "app-42",
        "pulze.labels.team": "search",
        "pulze.labels.env": "prod",
        "pulze.requested_model": "pulze",
        "pulze.served_model": "mistralai/mistral-small",
        "pulze.warning": "fell back to a cheaper model",
        "pulze.upstream_latency_s": 0.601,
        "llmtap.key_fingerprint": "fp_0123456789abcdef",
    }
    assert health.span_export_failures == 0


def test_stream_error_and_unknowns_left_out(receiver: OTLPHTTPReceiver) -> None:
    """Unknown values are absent (not zero); an unknown cost says so; failures are ERROR spans."""
    bare = dict.fromkeys(
        (
            "request_end",
            "response_start",
            "upstream_latency_s",
            "upstream_host",
            "upstream_port",
            "provider",
            "key_fingerprint",
            "app_id",
            "labels",
            "max_tokens",
            "temperature",
            "top_p",
            "n",
            "stop",
            "presence_penalty",
            "frequency_penalty",
            "seed",
            "response_format",
            "response_id",
            "response_model",
            "served_namespace",
            "input_tokens",
            "output_tokens",
            "total_tokens",
            "cached_input_tokens",
            "reasoning_tokens",
            "finish_reasons",
            "cost_usd",
            "cost_savings_usd",
            "retries",
            "score",
            "warning",
        ),
    )
    streamed = record(stream=True, first_token_at=T0 + 0.25, n=1)
    failed = record(
        **bare,
        cost_source="unknown",
        request_model=None,
        operation="text_completion",
        path="/v1/completions",
        http_status=429,
        error_type="http_429",
    )
    spans, _ = export(receiver, streamed, failed)
    by_id = {s.span_id: s for s in spans}

    stream_span = by_id[streamed.span_id]
    assert stream_span.attributes["gen_ai.request.stream"] is True
    assert stream_span.attributes["gen_ai.response.time_to_first_chunk"] == pytest.approx(0.25, abs=1e-6)
    assert "gen_ai.request.choice.count" not in stream_span.attributes  # n == 1 is the default

    error_span = by_id[failed.span_id]
    assert error_span.name == "text_completion"
    assert (error_span.status_code, error_span.status_message) == (Status.STATUS_CODE_ERROR, "http_429")
    assert error_span.attributes == {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.provider.name": "pulze",
        "gen_ai.request.stream": False,
        "error.type": "http_429",
        "pulze.cost_source": "unknown",
    }
    assert abs(error_span.end_ns - failed.response_end * 1e9) < MS


def test_incoming_traceparent_makes_the_span_its_child(receiver: OTLPHTTPReceiver) -> None:
    rec = record(traceparent=TRACEPARENT, trace_id=TRACEPARENT_TRACE)
    [span], _ = export(receiver, rec)
    assert (span.trace_id, span.parent_span_id, span.span_id) == (TRACEPARENT_TRACE, TRACEPARENT_PARENT, rec.span_id)


def test_unsampled_traceparent_and_sampler_env_are_respected(receiver, monkeypatch) -> None:
    """The app's "not sampled" flag and OTEL_TRACES_SAMPLER decide; nothing dropped is a failure."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    unsampled = record(traceparent=f"00-{TRACEPARENT_TRACE}-{TRACEPARENT_PARENT}-00", trace_id=TRACEPARENT_TRACE)
    kept = record()
    sampled_by_parent = SpanSink(Settings(otlp_endpoint=receiver.traces_url), health := Health())
    sampled_by_parent.emit(unsampled)
    sampled_by_parent.emit(kept)
    sampled_by_parent.close()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    never = SpanSink(Settings(otlp_endpoint=receiver.traces_url), health)
    never.emit(record())
    never.close()
    assert [s.span_id for s in receiver.spans] == [kept.span_id]
    assert health.span_export_failures == 0


def test_content_absent_by_default_even_if_a_record_carries_it(receiver: OTLPHTTPReceiver) -> None:
    export(receiver, record())
    raw = receiver.raw_bytes()
    assert raw and PROMPT.encode() not in raw and b"the lighthouse" not in raw and b"be brief" not in raw


def test_content_when_opted_in(receiver: OTLPHTTPReceiver) -> None:
    [span], _ = export(receiver, record(), capture_content=True)
    assert json.loads(span.attributes["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
        {"role": "user", "parts": [{"type": "text", "content": PROMPT}]},
    ]
    assert json.loads(span.attributes["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "the lighthouse"}], "finish_reason": "stop"},
    ]


def test_env_configuration_gzip_and_base_endpoint(receiver: OTLPHTTPReceiver, monkeypatch) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT is a base (the receiver 404s anything but /v1/traces)."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "checkout-sidecar")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging,team=payments")
    settings = Settings()
    assert settings.otlp_configured
    health = Health()
    sink = SpanSink(settings, health)
    sink.emit(record())
    sink.close()
    [span] = receiver.wait_spans(1)
    assert span.resource["service.name"] == "checkout-sidecar"
    assert span.resource["deployment.environment"] == "staging" and span.resource["team"] == "payments"
    assert [(path, headers.get("Content-Encoding")) for path, headers in receiver.requests] == [("/v1/traces", "gzip")]
    assert health.span_export_failures == 0


def test_grpc_protocol(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with OTLPGRPCReceiver() as grpc_receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", grpc_receiver.url)
        rec = record()
        health = Health()
        sink = SpanSink(Settings(), health)
        sink.emit(rec)
        sink.close()
        [span] = grpc_receiver.wait_spans(1)
    assert (span.name, span.span_id, span.attributes["gen_ai.provider.name"]) == (
        "chat pulze",
        rec.span_id,
        "mistral_ai",
    )
    assert health.span_export_failures == 0


def test_unsupported_protocol_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="http/json"):
        SpanSink(Settings(otlp_endpoint="http://127.0.0.1:9/v1/traces"), Health())


def test_collector_down_counts_failures_never_raises_logs_once(monkeypatch, caplog) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0.5")  # no retry fits: fail at once
    health = Health()
    sink = SpanSink(Settings(otlp_endpoint=f"http://127.0.0.1:{free_port()}/v1/traces"), health)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            sink.emit(record())
            sink.flush()  # one failed batch each
        sink.close()
    assert health.span_export_failures == 3
    assert [r.getMessage() for r in caplog.records].count(
        "Failed to export spans batch due to timeout, max retries or shutdown."
    ) == 1


class Blackhole:
    """A collector that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1/traces"
        self.connected = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            while True:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
                self.connected.set()
        except OSError:
            return

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.sock.close()


def test_hung_collector_full_queue_drops_newest_and_counts(monkeypatch) -> None:
    """While an export hangs, emit still returns at once: beyond the queue it drops and counts."""
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "2")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")
    hole = Blackhole()
    health = Health()
    sink = SpanSink(Settings(otlp_endpoint=hole.url), health)
    try:
        sink.emit(record())
        sink.emit(record())  # a full batch: the export thread takes both and hangs on the collector
        assert hole.connected.wait(5)
        for _ in range(5):  # 2 fit in the queue again, 3 are dropped
            sink.emit(record())
        # spans are built on the sink's thread: wait for it (dropped there or at the queue, 3 either way)
        wait_until(lambda: health.span_export_failures == 3 and health.gauges["span_queue_depth"]() == 2, timeout=5)
    finally:
        sink.close()
        hole.close()
    assert health.span_export_failures == 7  # every span is accounted for: none delivered


@pytest.mark.parametrize(
    "provider, router, expected",
    [
        ("openai", None, "openai"),
        ("OpenAI", "pulze", "openai"),
        ("anthropic", "pulze", "anthropic"),
        ("mistralai", "pulze", "mistral_ai"),
        ("Mistral", None, "mistral_ai"),
        ("cohere", "pulze", "cohere"),
        ("google", "pulze", "gcp.gemini"),
        ("groq", None, "groq"),
        ("deepseek", None, "deepseek"),
        ("perplexity", None, "perplexity"),
        ("xai", None, "x_ai"),
        ("x-ai", None, "x_ai"),
        ("azure-openai", None, "azure.ai.openai"),
        ("bedrock", None, "aws.bedrock"),
        ("meta", "pulze", "meta"),  # no conventions value: the provider's own name
        ("Together", None, "together"),
        (None, "pulze", "pulze"),
        (None, None, None),
    ],
)
def test_provider_names(provider, router, expected) -> None:
    assert provider_name(record(provider=provider, router=router)) == expected


# --- end to end: the real proxy, the openai SDK, the simulator ------------------------------


def chat(client: openai.OpenAI, stream: bool = False, **kwargs) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    answer = client.chat.completions.create(model="pulze", messages=messages, max_tokens=16, stream=stream, **kwargs)
    if stream:
        for _ in answer:
            pass


def complete(client: openai.OpenAI, stream: bool = False, **kwargs) -> None:
    answer = client.completions.create(
        model="openai/gpt-4o-mini", prompt=PROMPT, max_tokens=16, stream=stream, **kwargs
    )
    if stream:
        for _ in answer:
            pass


def test_e2e_http_streams_traceparent_errors_and_propagation(tmp_path: Path, simulator, receiver) -> None:
    """Base endpoint from the environment; four kinds of exchange, a child span, a fault, --propagate."""
    tap = start_tap(
        tmp_path,
        simulator.url,
        "--propagate",
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    try:
        with tap.client() as client:
            chat(client, extra_headers={"traceparent": TRACEPARENT})
            chat(client, stream=True)
            complete(client)
            complete(client, stream=True)
            with pytest.raises(openai.InternalServerError):
                chat(client, extra_headers={"X-Sim-Fault": "500"})
        records = tap.wait_records(5)
        spans = {s.span_id: s for s in receiver.wait_spans(5)}
    finally:
        tap.stop()

    kinds = [(r.operation, r.stream, r.error_type) for r in records]
    assert kinds == [
        ("chat", False, None),
        ("chat", True, None),
        ("text_completion", False, None),
        ("text_completion", True, None),
        ("chat", False, "http_500"),
    ]
    for rec in records:
        span = spans[rec.span_id]
        assert span.trace_id == rec.trace_id
        assert span.name == f"{rec.operation} {rec.request_model}"
        assert abs(span.start_ns - rec.request_start * 1e9) < MS
        assert abs(span.end_ns - rec.response_end * 1e9) < MS
        assert abs((span.end_ns - span.start_ns) / 1e9 - rec.duration_s) < 1e-3
        attrs = span.attributes
        assert attrs["gen_ai.operation.name"] == rec.operation
        assert attrs["gen_ai.request.stream"] is rec.stream
        assert (attrs["server.address"], attrs["server.port"]) == ("127.0.0.1", simulator.port)
        assert attrs["llmtap.key_fingerprint"] == rec.key_fingerprint
        if rec.error_type:
            assert span.status_code == Status.STATUS_CODE_ERROR and attrs["error.type"] == "http_500"
            continue
        assert span.status_code == Status.STATUS_CODE_UNSET
        assert attrs["gen_ai.provider.name"] == provider_name(rec) and rec.provider
        assert attrs["gen_ai.response.model"] == rec.response_model
        assert attrs["gen_ai.usage.input_tokens"] == rec.input_tokens > 0
        assert attrs["gen_ai.usage.output_tokens"] == rec.output_tokens > 0
        assert attrs["pulze.cost_usd"] == rec.cost_usd and attrs["pulze.cost_source"] == rec.cost_source
        assert attrs["gen_ai.response.finish_reasons"] == list(rec.finish_reasons)
        if rec.stream:
            assert attrs["gen_ai.response.time_to_first_chunk"] == pytest.approx(rec.time_to_first_token_s)

    # the app's traceparent: llmtap's span joins the app's trace as a child
    child = spans[records[0].span_id]
    assert (child.trace_id, child.parent_span_id) == (TRACEPARENT_TRACE, TRACEPARENT_PARENT)
    assert all(spans[r.span_id].parent_span_id == "" for r in records[1:])
    # --propagate: upstream saw llmtap's own span as its parent
    sent = [ex.request_headers.get("traceparent") for ex in simulator.exchanges]
    assert sent == [f"00-{r.trace_id}-{r.span_id}-01" for r in records]
    # content is opt-in: the prompt never left llmtap
    assert PROMPT.encode() not in receiver.raw_bytes()
    assert b"sk-test" not in receiver.raw_bytes() and API_KEY.encode() not in receiver.raw_bytes()


def test_e2e_grpc_and_content_capped(tmp_path: Path, simulator, monkeypatch) -> None:
    """gRPC with --otlp-endpoint; --capture-content puts capped messages on the span."""
    with OTLPGRPCReceiver() as grpc_receiver:
        tap = start_tap(
            tmp_path,
            simulator.url,
            "--otlp-endpoint",
            grpc_receiver.url,
            "--capture-content",
            "--set",
            "llmtap_content_max_chars=20",
            env={"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_BSP_SCHEDULE_DELAY": "100"},
        )
        try:
            with tap.client() as client:
                chat(client)
            [rec] = tap.wait_records(1)
            [span] = grpc_receiver.wait_spans(1)
        finally:
            tap.stop()
    assert span.span_id == rec.span_id and span.trace_id == rec.trace_id
    [message] = json.loads(span.attributes["gen_ai.input.messages"])
    assert message["role"] == "user"
    assert PROMPT.startswith(message["parts"][0]["content"]) and len(message["parts"][0]["content"]) <= 20
    [output] = json.loads(span.attributes["gen_ai.output.messages"])
    assert output["role"] == "assistant" and output["finish_reason"] == rec.finish_reasons[0]
    assert 0 < len(output["parts"][0]["content"]) <= 20
    assert API_KEY not in json.dumps(span.attributes)


@pytest.mark.parametrize("audit_args", [(), ("--db", "")], ids=["from-the-writer-process", "no-audit-log"])
def test_e2e_http_full_url_flag(tmp_path: Path, simulator, receiver, audit_args) -> None:
    """--otlp-endpoint is the full signal URL for http/protobuf; shutdown flushes what is queued.

    With the audit log on, its writer process exports the spans; without, the proxy does.
    """
    tap = start_tap(
        tmp_path,
        simulator.url,
        "--otlp-endpoint",
        receiver.traces_url,
        *audit_args,
        env={"OTEL_BSP_SCHEDULE_DELAY": "60000"},
    )
    try:
        with tap.client() as client:
            complete(client)
        [rec] = tap.wait_records(1)
    finally:
        code = tap.stop()
    assert code == 0
    [span] = receiver.wait_spans(1, timeout=1)  # only close() could have sent it (60 s schedule)
    assert span.span_id == rec.span_id


def test_e2e_collector_down_traffic_flows_failures_counted(tmp_path: Path, simulator) -> None:
    tap = start_tap(
        tmp_path,
        simulator.url,
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    try:
        with tap.client() as client:
            chat(client)
            chat(client, stream=True)
            complete(client)
        assert len(tap.wait_records(3)) == 3
        assert wait_until(lambda: tap.metric("llmtap_span_export_failures_total") >= 3, timeout=15)
    finally:
        tap.stop()


@pytest.mark.parametrize("suffix", ["", "/"])
def test_otlp_endpoint_without_a_path_gets_v1_traces(receiver: OTLPHTTPReceiver, suffix: str) -> None:
    """``--otlp-endpoint http://collector:4318`` works like OTEL_EXPORTER_OTLP_ENDPOINT."""
    [span], health = export_to(receiver, receiver.url + suffix, record())
    assert span.name
    assert [path for path, _ in receiver.requests] == ["/v1/traces"]
    assert health.span_export_failures == 0


def test_otlp_endpoint_with_a_path_is_used_as_is(receiver: OTLPHTTPReceiver) -> None:
    """A path is the user's choice: nothing is appended (the receiver 404s it, and that is counted)."""
    health = Health()
    sink = SpanSink(Settings(otlp_endpoint=receiver.url + "/custom/traces"), health)
    sink.emit(record())
    sink.close()
    assert [path for path, _ in receiver.requests] == ["/custom/traces"]
    assert receiver.spans == [] and health.span_export_failures == 1


def export_to(receiver: OTLPHTTPReceiver, endpoint: str, *records: ExchangeRecord):
    health = Health()
    sink = SpanSink(Settings(otlp_endpoint=endpoint), health)
    for r in records:
        sink.emit(r)
    sink.close()
    return receiver.wait_spans(len(records)), health
