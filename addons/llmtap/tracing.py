"""OpenTelemetry spans over OTLP: one CLIENT span per exchange, after the GenAI conventions.

The span is built after the fact from the finished record, with the record's own times and
with the ids the addon chose when the request arrived (so that ``--propagate`` can announce the
span upstream before it exists). llmtap uses its own ``TracerProvider``, never the global one,
so it cannot disturb (or be disturbed by) anything else in the process.

Configuration is the standard one: ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` (or
``--otlp-endpoint``: a URL without a path gets ``/v1/traces`` for OTLP/HTTP, one with a path is
used as-is), ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` (``http/protobuf`` or
``grpc``), ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, and the
``OTEL_BSP_*`` / ``OTEL_EXPORTER_OTLP_*`` tuning variables, all read by the SDK itself.

Failure policy: tracing must never cost the proxy anything. ``emit`` only builds the span and
queues it (no I/O on the event loop); a ``BatchSpanProcessor`` thread exports. A failed export
(a FAILURE result or an exception) is counted per span in ``health.span_export_failures`` and
never raised. The exporter gives up after a short timeout, so a dead collector cannot hold the
queue or the shutdown for long; while the queue is full, new spans are dropped and counted the
same way. The exporters' own log lines are kept to one per message.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.context import Context
from opentelemetry.sdk.environment_variables import (
    OTEL_BSP_MAX_QUEUE_SIZE,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TIMEOUT,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_TIMEOUT,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmtap import __version__
from llmtap.background import QueueThread
from llmtap.config import Settings
from llmtap.health import Health
from llmtap.record import ExchangeRecord, canonical_json

log = logging.getLogger("llmtap")

#: Seconds before the exporter gives a batch up (unless OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT is
#: set): long enough for a live collector on a LAN, short enough that a dead one cannot stall
#: the export thread or ``close()``.
EXPORT_TIMEOUT_S = 2.0
#: The SDK's own default for OTEL_BSP_MAX_QUEUE_SIZE.
DEFAULT_MAX_QUEUE = 2048

_Provider = gen_ai.GenAiProviderNameValues
#: llmtap/Pulze provider names (lower-case, punctuation removed) -> the conventions' values.
#: Providers the conventions do not list (meta, together, ...) keep their own lower-cased name.
PROVIDER_NAMES: dict[str, str] = {
    "openai": _Provider.OPENAI.value,
    "azure": _Provider.AZURE_AI_OPENAI.value,
    "azureopenai": _Provider.AZURE_AI_OPENAI.value,
    "anthropic": _Provider.ANTHROPIC.value,
    "mistral": _Provider.MISTRAL_AI.value,
    "mistralai": _Provider.MISTRAL_AI.value,
    "cohere": _Provider.COHERE.value,
    "google": _Provider.GCP_GEMINI.value,
    "gcpgemini": _Provider.GCP_GEMINI.value,
    "azureaiopenai": _Provider.AZURE_AI_OPENAI.value,
    "gemini": _Provider.GCP_GEMINI.value,
    "vertexai": _Provider.GCP_VERTEX_AI.value,
    "groq": _Provider.GROQ.value,
    "deepseek": _Provider.DEEPSEEK.value,
    "perplexity": _Provider.PERPLEXITY.value,
    "xai": _Provider.X_AI.value,
    "bedrock": _Provider.AWS_BEDROCK.value,
    "awsbedrock": _Provider.AWS_BEDROCK.value,
    "watsonx": _Provider.IBM_WATSONX_AI.value,
    "ibmwatsonx": _Provider.IBM_WATSONX_AI.value,
}

_PROPAGATOR = TraceContextTextMapPropagator()
#: (trace id, span id) of the record whose span is being started; read by ``_RecordIds``.
_RECORD_IDS: ContextVar[tuple[int | None, int | None]] = ContextVar("llmtap_record_ids", default=(None, None))


def provider_name(record: ExchangeRecord) -> str | None:
    """``gen_ai.provider.name``: the conventions' value, else the raw name, else the router."""
    if record.provider:
        key = "".join(ch for ch in record.provider.lower() if ch.isalnum())
        return PROVIDER_NAMES.get(key, record.provider.lower())
    return "pulze" if record.router == "pulze" else None


def span_name(record: ExchangeRecord) -> str:
    return f"{record.operation} {record.request_model}" if record.request_model else record.operation


def span_attributes(record: ExchangeRecord, capture_content: bool) -> dict[str, Any]:
    """The span's attributes; unknown (``None``) values are left out, never sent as zero."""
    attributes: dict[str, Any] = {
        gen_ai.GEN_AI_OPERATION_NAME: record.operation,
        gen_ai.GEN_AI_PROVIDER_NAME: provider_name(record),
        gen_ai.GEN_AI_REQUEST_MODEL: record.request_model,
        gen_ai.GEN_AI_REQUEST_MAX_TOKENS: record.max_tokens,
        gen_ai.GEN_AI_REQUEST_TEMPERATURE: record.temperature,
        gen_ai.GEN_AI_REQUEST_TOP_P: record.top_p,
        gen_ai.GEN_AI_REQUEST_FREQUENCY_PENALTY: record.frequency_penalty,
        gen_ai.GEN_AI_REQUEST_PRESENCE_PENALTY: record.presence_penalty,
        gen_ai.GEN_AI_REQUEST_STOP_SEQUENCES: record.stop,
        gen_ai.GEN_AI_REQUEST_CHOICE_COUNT: record.n if record.n != 1 else None,
        gen_ai.GEN_AI_REQUEST_SEED: record.seed,
        gen_ai.GEN_AI_REQUEST_STREAM: record.stream,
        gen_ai.GEN_AI_OUTPUT_TYPE: _output_type(record.response_format),
        gen_ai.GEN_AI_RESPONSE_ID: record.response_id,
        gen_ai.GEN_AI_RESPONSE_MODEL: record.response_model,
        gen_ai.GEN_AI_RESPONSE_FINISH_REASONS: record.finish_reasons,
        gen_ai.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK: record.time_to_first_token_s if record.stream else None,
        gen_ai.GEN_AI_USAGE_INPUT_TOKENS: record.input_tokens,
        gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS: record.output_tokens,
        gen_ai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: record.cached_input_tokens,
        gen_ai.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS: record.cache_write_input_tokens,
        gen_ai.GEN_AI_CONVERSATION_ID: record.conversation_id,
        gen_ai.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: record.reasoning_tokens,
        SERVER_ADDRESS: record.upstream_host,
        SERVER_PORT: record.upstream_port,
        ERROR_TYPE: record.error_type,
        # No conventions exist for these: llmtap's own names, as literal strings.
        "pulze.cost_usd": record.cost_usd,
        "pulze.cost_source": record.cost_source,  # "unknown" keeps an unknown cost apart from $0
        "llmtap.cost_nanousd": record.cost_nanousd,  # exact, integer nano-dollars
        "llmtap.price_version": record.price_version,  # the price data: genai-prices:0.0.61, user:<sha256>
        "llmtap.price_model": record.price_model,  # the price entry matched
        "llmtap.service_tier": record.service_tier,
        "gen_ai.usage.cache_creation.input_tokens": record.cache_write_input_tokens,  # semconv 1.42 (genai repo)
        "llmtap.usage.cache_write_1h_input_tokens": record.cache_write_1h_input_tokens,
        "pulze.cost_savings_usd": record.cost_savings_usd,
        "pulze.retries": record.retries,
        "pulze.score": record.score,
        "pulze.app_id": record.app_id,
        "pulze.requested_model": record.request_model,
        "pulze.served_model": record.served_namespace,
        "pulze.warning": record.warning,
        "pulze.upstream_latency_s": record.upstream_latency_s,
        "llmtap.key_fingerprint": record.key_fingerprint,
    }
    attributes.update({f"pulze.labels.{key}": value for key, value in (record.labels or {}).items()})
    if capture_content:
        attributes[gen_ai.GEN_AI_INPUT_MESSAGES] = _messages_json(record.input_messages)
        attributes[gen_ai.GEN_AI_OUTPUT_MESSAGES] = _messages_json(record.output_messages)
    return {key: value for key, value in attributes.items() if value is not None}


def _output_type(response_format: str | None) -> str | None:
    if response_format is None:
        return None
    return "json" if response_format.startswith("json") else response_format


def _messages_json(messages: Sequence[Mapping[str, Any]] | None) -> str | None:
    """Messages in the conventions' shape: role, text parts, and finish_reason on outputs."""
    if messages is None:
        return None
    converted = []
    for message in messages:
        content = message.get("content")
        parts = (
            []
            if content is None
            else [{"type": "text", "content": content if isinstance(content, str) else canonical_json(content)}]
        )
        item: dict[str, Any] = {"role": message.get("role"), "parts": parts}
        if message.get("finish_reason") is not None:
            item["finish_reason"] = message["finish_reason"]
        converted.append(item)
    return canonical_json(converted)


def _hex_id(value: str | None, digits: int) -> int | None:
    """A valid non-zero W3C id of ``digits`` hex digits as an int, else None."""
    if value is None or len(value) != digits:
        return None
    try:
        number = int(value, 16)
    except ValueError:
        return None
    return number or None


class _RecordIds(RandomIdGenerator):
    """Gives the SDK the ids the addon chose for the record; random ones where it has none."""

    def generate_trace_id(self) -> int:
        return _RECORD_IDS.get()[0] or super().generate_trace_id()

    def generate_span_id(self) -> int:
        return _RECORD_IDS.get()[1] or super().generate_span_id()


class _GuardedExporter(SpanExporter):
    """Wraps the OTLP exporter: counts what fails, never raises, knows how much is queued.

    ``pending`` counts spans handed to the batch processor and not yet given to an export; as
    long as ``admit`` keeps it under the processor's queue size, the processor never drops
    silently: llmtap drops (and counts) before it does.
    """

    def __init__(self, inner: SpanExporter, health: Health, max_queue: int) -> None:
        self._inner = inner
        self._health = health
        self._max_queue = max_queue
        self._lock = threading.Lock()
        self._logged = False
        self.pending = 0

    def admit(self) -> bool:
        with self._lock:
            if self.pending >= self._max_queue:
                return False
            self.pending += 1
            return True

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            self.pending -= len(spans)
        try:
            result = self._inner.export(spans)
        except Exception as exc:  # fail open: the exporter's bug must not kill the export thread
            if not self._logged:
                self._logged = True
                log.warning(
                    "llmtap span export raised %s: %s (further failures are only counted)", type(exc).__name__, exc
                )
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._health.add_span_export_failures(len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class RecordSpans(QueueThread):
    """One OTLP span per record, exported in batches by the SDK's own thread.

    Building a span (the SDK checks every attribute) takes a few hundred microseconds, so
    ``emit`` only queues the record; this sink's thread builds the span and hands it to the
    batch processor. A record that finds the queue full is counted as an export failure.
    """

    name = "spans"

    def __init__(self, settings: Settings, health: Health) -> None:
        super().__init__(health, maxsize=_max_queue())
        self.health = health
        self.capture_content = settings.capture_content
        inner = make_exporter(settings.otlp_endpoint or None)
        self._log_filters = _quiet_repeats(inner)
        max_queue = _max_queue()
        self._exporter = _GuardedExporter(inner, health, max_queue)
        self._provider = TracerProvider(resource=make_resource(), id_generator=_RecordIds(), shutdown_on_exit=False)
        self._provider.add_span_processor(BatchSpanProcessor(self._exporter, max_queue_size=max_queue))
        self._tracer = self._provider.get_tracer("llmtap", __version__)
        health.gauges["span_queue_depth"] = lambda: self._exporter.pending

    def dropped(self, exc: Exception) -> None:
        self.health.add_span_export_failures(1)

    def handle(self, record: ExchangeRecord) -> None:
        parent = Context()
        if record.traceparent:
            parent = _PROPAGATOR.extract({"traceparent": record.traceparent}, context=parent)
        token = _RECORD_IDS.set((_hex_id(record.trace_id, 32), _hex_id(record.span_id, 16)))
        try:
            span = self._tracer.start_span(
                span_name(record),
                context=parent,
                kind=SpanKind.CLIENT,
                attributes=span_attributes(record, self.capture_content),
                start_time=_ns(record.request_start),
            )
        finally:
            _RECORD_IDS.reset(token)
        if not span.get_span_context().trace_flags.sampled:
            return  # the sampler (or the app's unsampled traceparent) said no: nothing is queued
        if not self._exporter.admit():
            self.health.add_span_export_failures(1)  # queue full: dropped before it was ended
            return
        if record.error_type is not None:
            span.set_status(Status(StatusCode.ERROR, record.error_type))
        end = record.response_end or record.request_end or record.request_start
        span.end(end_time=_ns(end))

    def flush(self, timeout: float = 10.0) -> None:
        super().flush(timeout)
        self._provider.force_flush(int(timeout * 1000))

    def close(self) -> None:
        super().close()  # builds what is queued, then flushes
        self._provider.shutdown()
        self.health.gauges.pop("span_queue_depth", None)
        for logger, log_filter in self._log_filters:
            logger.removeFilter(log_filter)


def http_traces_endpoint(endpoint: str | None) -> str | None:
    """``--otlp-endpoint`` for OTLP/HTTP: a bare collector URL (no path) gets ``/v1/traces``, as
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` does; a URL with a path is used as it is."""
    if not endpoint:
        return endpoint
    parts = urlsplit(endpoint)
    if parts.path in ("", "/"):
        return urlunsplit(parts._replace(path="/v1/traces"))
    return endpoint


def make_exporter(endpoint: str | None) -> SpanExporter:
    """The OTLP exporter for the configured protocol; ``endpoint=None`` lets the SDK read the
    standard variables (``OTEL_EXPORTER_OTLP_ENDPOINT`` is a base: ``/v1/traces`` is appended
    for http; ``..._TRACES_ENDPOINT`` is used as it is). An explicit endpoint without a path gets
    ``/v1/traces`` for http (see ``http_traces_endpoint``); gRPC takes host:port.

    The exporters are imported here, so that an llmtap without tracing never loads them.
    """
    protocol = (
        (
            os.environ.get(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL)
            or os.environ.get(OTEL_EXPORTER_OTLP_PROTOCOL)
            or "http/protobuf"
        )
        .strip()
        .lower()
    )
    timeout = None if _timeout_configured() else EXPORT_TIMEOUT_S
    if protocol == "http/protobuf":
        endpoint = http_traces_endpoint(endpoint)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter

        return HTTPExporter(endpoint=endpoint, timeout=timeout)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GRPCExporter

        return GRPCExporter(endpoint=endpoint, timeout=timeout)
    raise ValueError(f"unsupported OTLP protocol {protocol!r}: use 'http/protobuf' or 'grpc'")


def make_resource() -> Resource:
    """The SDK's resource from OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES; named ``llmtap``
    when neither names the service."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "llmtap"}))
    return resource


def _timeout_configured() -> bool:
    return bool(os.environ.get(OTEL_EXPORTER_OTLP_TRACES_TIMEOUT) or os.environ.get(OTEL_EXPORTER_OTLP_TIMEOUT))


def _max_queue() -> int:
    try:
        return int(os.environ[OTEL_BSP_MAX_QUEUE_SIZE])
    except (KeyError, ValueError):
        return DEFAULT_MAX_QUEUE


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def _quiet_repeats(exporter: SpanExporter) -> list[tuple[logging.Logger, Any]]:
    """Let each of the exporter's log messages through once: a dead collector would otherwise
    log a warning per batch for as long as it stays dead (the counter keeps counting)."""
    seen: set[str] = set()
    lock = threading.Lock()

    def first_time(record: logging.LogRecord) -> bool:
        with lock:
            new = str(record.msg) not in seen
            seen.add(str(record.msg))
        return new

    modules = {cls.__module__ for cls in type(exporter).__mro__}
    loggers = [logging.getLogger(name) for name in modules if name.startswith("opentelemetry.exporter.")]
    for logger in loggers:
        logger.addFilter(first_time)
    return [(logger, first_time) for logger in loggers]
