"""Prometheus metrics: each record becomes counters and histograms, served on ``/metrics``.

Names follow the OpenTelemetry GenAI semantic conventions in Prometheus form where one exists
(``gen_ai_client_*``, spec buckets) and carry the ``llmtap_`` prefix otherwise. Everything that
accumulates is a counter; self-health is read from ``Health`` at scrape time.

Cardinality is bounded: every label value that comes from users or upstreams (models,
providers, apps, HTTP methods, allow-listed ``Pulze-Labels`` keys, the key fingerprint) goes
through ``LabelCap``. Past ``settings.label_limit`` distinct values per label, new values are
folded into ``other`` and counted in ``llmtap_label_overflow_total{label}``.

Failure policy: ``emit`` is in-memory arithmetic on the event loop, with no I/O and no lock
contention (labelled children are cached). Spend is added through
``llmtap.pricing.validity.spend_amount``, the rule the record's numbers were already checked
against (``resolve_cost``), so ``llmtap_cost_usd_total`` equals the audit log's sum of
``cost_usd``; each number left out of a record as an anomaly counts once in
``llmtap_anomalies_total{field}`` (field names are llmtap's own: a bounded set). Negative cost
savings, which Pulze may report, are in the audit log but cannot go into a counter. Anything unexpected propagates to the addon,
which counts it as an internal error; the exchange itself is never touched. The HTTP server
runs in prometheus_client's daemon thread; failing to bind it at startup raises, and the addon
then serves traffic without the endpoint, logging it and counting ``start_metrics``.
"""

from __future__ import annotations

import math
import platform
import re
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from mitmproxy.version import VERSION as MITMPROXY_VERSION
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llmtap import __version__
from llmtap.config import Settings
from llmtap.health import Health
from llmtap.pricing.validity import spend_amount
from llmtap.record import ExchangeRecord

#: gen_ai.client.operation.duration and .time_to_first_chunk (semconv v1.41 explicit buckets).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
#: gen_ai.client.token.usage (semconv v1.41 explicit buckets, powers of 4).
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
#: Pulze's metadata.score lies in [0, 1]; tenths show the router's confidence drifting without
#: multiplying series (the default latency buckets would put every score in the first two).
SCORE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))

UNKNOWN = "unknown"  # the record did not say (None): never folded, never counted as overflow
OTHER = "other"  # a value past the label's cap
MAX_VALUE_CHARS = 200  # a label value is a name, not a payload

_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]")  # what Prometheus forbids in metric and label names
GENAI_TOKEN_TYPES = ("input", "output")  # the spec's gen_ai.token.type values
GENAI_LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model")


class ExtraLabel(NamedTuple):
    """A label the user allow-listed with ``--metric-label``."""

    name: str  # Prometheus label name: ``label_<key>`` or ``key_fingerprint``
    key: str | None  # the Pulze-Labels key, or None for the key fingerprint


def extra_labels(keys: Sequence[str]) -> tuple[ExtraLabel, ...]:
    """``--metric-label`` values as label names; ``key`` means the API key's fingerprint."""
    out: dict[str, ExtraLabel] = {}
    for key in keys:
        if key == "key":
            label = ExtraLabel("key_fingerprint", None)
        else:
            label = ExtraLabel("label_" + _NOT_NAME.sub("_", key), key)
        out.setdefault(label.name, label)  # a key that sanitises to a taken name is ignored
    return tuple(out.values())


class LabelCap:
    """Bounds the distinct values of each label; touched on the event loop only (no lock)."""

    def __init__(self, limit: int, health: Health) -> None:
        self.limit = limit
        self.health = health
        self._seen: dict[str, set[str]] = {}

    def __call__(self, label: str, value: Any) -> str:
        if value is None:
            return UNKNOWN
        value = str(value)[:MAX_VALUE_CHARS]
        seen = self._seen.setdefault(label, set())
        if value in seen:
            return value
        if len(seen) < self.limit:
            seen.add(value)
            return value
        self.health.add_label_overflow(label)
        return OTHER


class _Children:
    """A labelled metric whose children are cached: ``labels()`` locks and re-validates."""

    __slots__ = ("_cache", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._cache.get(values)
        if child is None:
            child = self._cache[values] = self._metric.labels(*values)
        return child


_amount = spend_amount  # a value a counter can add, or None (absent, negative, NaN or infinite)


class Metrics:
    """Every llmtap metric, registered on one injected registry."""

    def __init__(self, registry: CollectorRegistry, settings: Settings, health: Health) -> None:
        # Prometheus' text parser stores every `_created` sample as a series of its own, which
        # would double the series count; the switch is process-wide, and llmtap owns the process.
        disable_created_metrics()
        self.cap = LabelCap(settings.label_limit, health)
        self.extras = extra_labels(settings.metric_labels)
        extra = tuple(label.name for label in self.extras)

        def counter(name: str, doc: str, labels: Sequence[str]) -> _Children:
            return _Children(Counter(name, doc, labels, registry=registry))

        def histogram(name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]) -> _Children:
            return _Children(Histogram(name, doc, labels, registry=registry, buckets=buckets))

        self.duration = histogram(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operation duration: first request byte to last response byte.",
            (*GENAI_LABELS, "error_type"),
            DURATION_BUCKETS,
        )
        self.first_chunk = histogram(
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "Time to the first content-carrying chunk of a streamed response.",
            GENAI_LABELS,
            DURATION_BUCKETS,
        )
        self.token_usage = histogram(
            "gen_ai_client_token_usage",
            "Tokens per operation, by gen_ai_token_type (input|output).",
            (*GENAI_LABELS, "gen_ai_token_type"),
            TOKEN_BUCKETS,
        )
        self.requests = counter(
            "llmtap_requests_total",
            "Completion exchanges seen.",
            ("operation", "provider", "request_model", "response_model", "status_code", "stream", "app", *extra),
        )
        self.tokens = counter(
            "llmtap_tokens_total",
            "Tokens reported by upstreams, by type.",
            ("type", "provider", "response_model", "app", *extra),
        )
        self.cost = counter(
            "llmtap_cost_usd_total",
            "Spend in USD (exchanges whose cost is unknown add nothing).",
            ("provider", "response_model", "app", "cost_source", *extra),
        )
        self.savings = counter(
            "llmtap_cost_savings_usd_total",
            "USD saved against Pulze's reference model, as reported.",
            ("provider", "response_model", "app"),
        )
        self.unpriced = counter(
            "llmtap_unpriced_requests_total",
            "Successful exchanges whose cost is unknown.",
            ("provider", "response_model"),
        )
        self.upstream_latency = histogram(
            "llmtap_upstream_latency_seconds",
            "The provider's own time to answer (metadata.latency).",
            ("provider", "response_model"),
            DURATION_BUCKETS,
        )
        self.retries = counter(
            "llmtap_retries_total",
            "Retries made by the router (metadata.retries).",
            ("provider", "response_model"),
        )
        self.errors = counter("llmtap_errors_total", "Failed exchanges, by error type.", ("operation", "error_type"))
        self.routed = counter(
            "llmtap_routed_requests_total",
            "Exchanges by requested and serving model (routing decisions).",
            ("request_model", "response_model", "provider"),
        )
        self.score = histogram(
            "llmtap_routing_score",
            "Router score of the model that served (metadata.score).",
            ("provider", "response_model"),
            SCORE_BUCKETS,
        )
        self.anomalies = counter(
            "llmtap_anomalies_total",
            "Numbers from upstreams left out of a record (negative, not finite, above a ceiling), by field.",
            ("field",),
        )
        self.passthrough = counter(
            "llmtap_passthrough_requests_total",
            "Non-completion requests passed through untouched.",
            ("method",),
        )
        registry.register(HealthCollector(health))

    def observe(self, r: ExchangeRecord) -> None:
        cap = self.cap
        provider = cap("provider", r.provider)
        request_model = cap("request_model", r.request_model)
        response_model = cap("response_model", r.response_model)
        app = cap("app", r.app_id)
        extra = tuple(cap(label.name, _extra_value(r, label)) for label in self.extras)
        genai = (r.operation, provider, request_model, response_model)
        by_model = (provider, response_model)

        status = "none" if r.http_status is None else str(r.http_status)
        self.requests(
            r.operation, provider, request_model, response_model, status, "true" if r.stream else "false", app, *extra
        ).inc()
        if (duration := r.duration_s) is not None:
            self.duration(*genai, r.error_type or "").observe(duration)
        if r.stream and (ttfc := r.time_to_first_token_s) is not None:
            self.first_chunk(*genai).observe(ttfc)
        for token_type, count in (
            ("input", r.input_tokens),
            ("output", r.output_tokens),
            ("cached_input", r.cached_input_tokens),
            ("cache_write", r.cache_write_input_tokens),
            ("reasoning", r.reasoning_tokens),
        ):
            if (count := _amount(count)) is None:
                continue
            self.tokens(token_type, provider, response_model, app, *extra).inc(count)
            if token_type in GENAI_TOKEN_TYPES:
                self.token_usage(*genai, token_type).observe(count)
        # the audit log's exact amount when there is one, so that metrics and reports agree
        if (cost := _amount(r.cost_usd if r.cost_nanousd is None else r.cost_nanousd / 1e9)) is not None:
            self.cost(provider, response_model, app, r.cost_source, *extra).inc(cost)
        if (savings := _amount(r.cost_savings_usd)) is not None:  # negative savings cannot be counted
            self.savings(provider, response_model, app).inc(savings)
        if r.ok and r.cost_source == "unknown":
            self.unpriced(*by_model).inc()
        if (latency := _amount(r.upstream_latency_s)) is not None:
            self.upstream_latency(*by_model).observe(latency)
        if retries := _amount(r.retries):
            self.retries(*by_model).inc(retries)
        if r.error_type is not None:
            self.errors(r.operation, r.error_type).inc()
        if r.response_model is not None:
            self.routed(request_model, response_model, provider).inc()
        if r.score is not None and math.isfinite(r.score):
            self.score(*by_model).observe(r.score)
        if r.anomalies:
            for name in r.anomalies:
                self.anomalies(self.cap("anomaly_field", name)).inc()

    def count_passthrough(self, method: str) -> None:
        self.passthrough(self.cap("method", method)).inc()


def _extra_value(r: ExchangeRecord, label: ExtraLabel) -> str | None:
    if label.key is None:
        return r.key_fingerprint
    return None if r.labels is None else r.labels.get(label.key)


class HealthCollector(Collector):
    """llmtap's self-health, read from ``Health`` at each scrape (nothing to keep in sync)."""

    def __init__(self, health: Health) -> None:
        self.health = health
        self.build = {
            "version": __version__,
            "mitmproxy_version": MITMPROXY_VERSION,
            "python_version": platform.python_version(),
        }

    def collect(self) -> Iterator[Any]:
        h = self.health
        # dict(...) copies a Counter atomically under the GIL while the loop may be adding stages.
        yield _labelled(
            CounterMetricFamily(
                "llmtap_internal_errors",
                "Faults of llmtap's own, by stage (the exchange went on).",
                labels=["stage"],
            ),
            dict(h.internal_errors),
        )
        yield _labelled(
            CounterMetricFamily(
                "llmtap_label_overflow",
                "Label values folded into 'other' past the cap, by label.",
                labels=["label"],
            ),
            dict(h.label_overflow),
        )
        yield CounterMetricFamily("llmtap_audit_dropped", "Audit rows lost.", value=h.audit_dropped)
        yield CounterMetricFamily(
            "llmtap_span_export_failures",
            "Spans the OTLP exporter failed to deliver.",
            value=h.span_export_failures,
        )
        yield GaugeMetricFamily(
            "llmtap_in_flight_requests",
            "Exchanges started and not yet recorded.",
            value=h.in_flight,
        )
        for name, read in list(h.gauges.items()):
            try:
                value = float(read())
            except Exception as exc:  # a sink's gauge must not break the scrape
                h.error("metrics", exc, f"reading gauge {name}")
                continue
            yield GaugeMetricFamily("llmtap_" + _NOT_NAME.sub("_", name), f"Health gauge {name}.", value=value)
        info = GaugeMetricFamily(
            "llmtap_build_info",
            "Always 1; the labels say what is running.",
            labels=list(self.build),
        )
        info.add_metric(list(self.build.values()), 1)
        yield info


def _labelled(family: CounterMetricFamily, values: dict[str, int]) -> CounterMetricFamily:
    for label, value in sorted(values.items()):
        family.add_metric([label], value)
    return family


class MetricsSink:
    """The sink the addon feeds: owns the ``Metrics`` and the ``/metrics`` HTTP server."""

    name = "metrics"

    def __init__(self, settings: Settings, health: Health, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry, settings, health)
        self.port: int | None = None  # the bound port, or None when the endpoint is off
        self._server = self._thread = None
        if settings.metrics_port >= 0:
            self._server, self._thread = start_http_server(
                settings.metrics_port, settings.metrics_host, registry=self.registry
            )
            self.port = self._server.server_port

    def emit(self, record: ExchangeRecord) -> None:
        self.metrics.observe(record)

    def passthrough(self, method: str) -> None:
        """Count a non-completion request (``/v1/models/rank``, ``/v1/logs``, ...)."""
        self.metrics.count_passthrough(method)

    def flush(self, timeout: float = 10.0) -> None:
        """Nothing is buffered: a scrape always sees every emitted record."""

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()  # shutdown() alone keeps the port bound
            self._thread.join(timeout=5)
            self._server = self._thread = None
