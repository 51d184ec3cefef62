"""The metrics sink fed hand-built records, read back with ``CollectorRegistry.get_sample_value``."""

from __future__ import annotations

import itertools
import math
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from llmtap.config import Settings
from llmtap.health import Health
from llmtap.record import ExchangeRecord
from llmtap.sinks.metrics import MetricsSink, extra_labels

_ids = itertools.count()


def record(**fields) -> ExchangeRecord:
    """A successful, reported-cost chat exchange unless ``fields`` say otherwise."""
    base = dict(
        exchange_id=f"x{next(_ids)}",
        operation="chat",
        method="POST",
        path="/v1/chat/completions",
        request_start=1000.0,
        response_end=1000.5,
        request_model="pulze",
        response_model="openai/gpt-4o",
        provider="openai",
        http_status=200,
        app_id="app1",
        input_tokens=12,
        output_tokens=30,
        cost_usd=0.00066,
        cost_source="reported",
    )
    return ExchangeRecord(**{**base, **fields})


def make_sink(**settings) -> tuple[MetricsSink, CollectorRegistry, Health]:
    registry, health = CollectorRegistry(), Health()
    sink = MetricsSink(Settings(metrics_port=-1, **settings), health, registry=registry)
    return sink, registry, health


def series_count(registry: CollectorRegistry) -> int:
    return sum(len(family.samples) for family in registry.collect())


def label_values(registry: CollectorRegistry, label: str) -> set[str]:
    return {s.labels[label] for family in registry.collect() for s in family.samples if label in s.labels}


REQ = dict(operation="chat", provider="openai", request_model="pulze", response_model="openai/gpt-4o", app="app1")
GENAI = dict(
    gen_ai_operation_name="chat",
    gen_ai_provider_name="openai",
    gen_ai_request_model="pulze",
    gen_ai_response_model="openai/gpt-4o",
)
BY_MODEL = dict(provider="openai", response_model="openai/gpt-4o")


@pytest.fixture
def fed() -> CollectorRegistry:
    """A registry after a known mix: two priced chats, a priced stream, an unpriced one, a 429."""
    sink, registry, _ = make_sink()
    sink.emit(record(upstream_latency_s=0.3, retries=2, score=0.75, cost_savings_usd=0.01))
    sink.emit(record(response_end=1001.0, cached_input_tokens=4, reasoning_tokens=7, cost_savings_usd=0.02))
    sink.emit(
        record(
            stream=True,
            first_token_at=1000.1,
            response_end=1002.0,
            input_tokens=5,
            output_tokens=9,
            cost_usd=0.0001,
            cost_source="computed",
        )
    )
    sink.emit(record(cost_usd=None, cost_source="unknown"))
    sink.emit(
        record(
            http_status=429,
            error_type="http_429",
            response_model=None,
            input_tokens=None,
            output_tokens=None,
            cost_usd=None,
            cost_source="unknown",
        )
    )
    return registry


@pytest.mark.parametrize(
    "name, labels, expected",
    [
        ("llmtap_requests_total", {**REQ, "status_code": "200", "stream": "false"}, 3),
        ("llmtap_requests_total", {**REQ, "status_code": "200", "stream": "true"}, 1),
        ("llmtap_requests_total", {**REQ, "response_model": "unknown", "status_code": "429", "stream": "false"}, 1),
        ("gen_ai_client_operation_duration_seconds_count", {**GENAI, "error_type": ""}, 4),
        ("gen_ai_client_operation_duration_seconds_sum", {**GENAI, "error_type": ""}, 0.5 + 1.0 + 2.0 + 0.5),
        ("gen_ai_client_operation_duration_seconds_bucket", {**GENAI, "error_type": "", "le": "0.64"}, 2),
        ("gen_ai_client_operation_duration_seconds_bucket", {**GENAI, "error_type": "", "le": "1.28"}, 3),
        ("gen_ai_client_operation_duration_seconds_bucket", {**GENAI, "error_type": "", "le": "+Inf"}, 4),
        (
            "gen_ai_client_operation_duration_seconds_count",
            {**GENAI, "gen_ai_response_model": "unknown", "error_type": "http_429"},
            1,
        ),
        ("gen_ai_client_operation_time_to_first_chunk_seconds_count", GENAI, 1),
        ("gen_ai_client_operation_time_to_first_chunk_seconds_sum", GENAI, pytest.approx(0.1)),
        ("gen_ai_client_token_usage_sum", {**GENAI, "gen_ai_token_type": "input"}, 12 * 3 + 5),
        ("gen_ai_client_token_usage_sum", {**GENAI, "gen_ai_token_type": "output"}, 30 * 3 + 9),
        ("gen_ai_client_token_usage_count", {**GENAI, "gen_ai_token_type": "output"}, 4),
        ("gen_ai_client_token_usage_bucket", {**GENAI, "gen_ai_token_type": "output", "le": "16.0"}, 1),
        ("llmtap_tokens_total", {"type": "input", **BY_MODEL, "app": "app1"}, 12 * 3 + 5),
        ("llmtap_tokens_total", {"type": "output", **BY_MODEL, "app": "app1"}, 30 * 3 + 9),
        ("llmtap_tokens_total", {"type": "cached_input", **BY_MODEL, "app": "app1"}, 4),
        ("llmtap_tokens_total", {"type": "reasoning", **BY_MODEL, "app": "app1"}, 7),
        ("llmtap_cost_usd_total", {**BY_MODEL, "app": "app1", "cost_source": "reported"}, pytest.approx(0.00132)),
        ("llmtap_cost_usd_total", {**BY_MODEL, "app": "app1", "cost_source": "computed"}, pytest.approx(0.0001)),
        ("llmtap_cost_usd_total", {**BY_MODEL, "app": "app1", "cost_source": "unknown"}, None),  # unknown is not $0
        ("llmtap_cost_savings_usd_total", {**BY_MODEL, "app": "app1"}, pytest.approx(0.03)),
        ("llmtap_unpriced_requests_total", BY_MODEL, 1),  # the failed exchange is not "unpriced"
        ("llmtap_unpriced_requests_total", {"provider": "openai", "response_model": "unknown"}, None),
        ("llmtap_upstream_latency_seconds_sum", BY_MODEL, 0.3),
        ("llmtap_upstream_latency_seconds_bucket", {**BY_MODEL, "le": "0.32"}, 1),
        ("llmtap_retries_total", BY_MODEL, 2),
        ("llmtap_errors_total", {"operation": "chat", "error_type": "http_429"}, 1),
        ("llmtap_routed_requests_total", {"request_model": "pulze", **BY_MODEL}, 4),
        (
            "llmtap_routed_requests_total",
            {"request_model": "pulze", "response_model": "unknown", "provider": "openai"},
            None,
        ),
        ("llmtap_routing_score_bucket", {**BY_MODEL, "le": "0.7"}, 0),
        ("llmtap_routing_score_bucket", {**BY_MODEL, "le": "0.8"}, 1),
        ("llmtap_routing_score_count", BY_MODEL, 1),
    ],
)
def test_values_after_known_records(fed: CollectorRegistry, name: str, labels: dict, expected) -> None:
    assert fed.get_sample_value(name, labels) == expected


def test_unknown_values_and_missing_response() -> None:
    sink, registry, _ = make_sink()
    sink.emit(
        ExchangeRecord(
            "x", "text_completion", "POST", "/v1/completions", request_start=1.0, error_type="upstream_unreachable"
        )
    )
    labels = dict(
        operation="text_completion",
        provider="unknown",
        request_model="unknown",
        response_model="unknown",
        status_code="none",
        stream="false",
        app="unknown",
    )
    assert registry.get_sample_value("llmtap_requests_total", labels) == 1
    assert (
        registry.get_sample_value(
            "llmtap_errors_total", {"operation": "text_completion", "error_type": "upstream_unreachable"}
        )
        == 1
    )
    assert label_values(registry, "gen_ai_operation_name") == set()  # no duration without an end


@pytest.mark.parametrize(
    "fields",
    [
        dict(cost_savings_usd=-0.5),  # a model dearer than the reference: a counter cannot go down
        dict(cost_usd=math.nan),
        dict(cost_usd=-1.0),
        dict(upstream_latency_s=math.inf),
        dict(input_tokens=-3, retries=-1),
        dict(score=math.nan),
    ],
)
def test_amounts_a_counter_cannot_take_are_left_out(fields: dict) -> None:
    sink, registry, _ = make_sink()
    sink.emit(record(**fields))
    assert registry.get_sample_value("llmtap_requests_total", {**REQ, "status_code": "200", "stream": "false"}) == 1
    for family in registry.collect():
        for sample in family.samples:
            assert math.isfinite(sample.value) and sample.value >= 0, sample


def test_passthrough_counted_by_method() -> None:
    sink, registry, _ = make_sink()
    for method in ("GET", "GET", "POST"):
        sink.passthrough(method)
    assert registry.get_sample_value("llmtap_passthrough_requests_total", {"method": "GET"}) == 2
    assert registry.get_sample_value("llmtap_passthrough_requests_total", {"method": "POST"}) == 1


def test_self_health_read_at_scrape_time() -> None:
    _sink, registry, health = make_sink()
    health.error("audit", OSError("disk full"))
    health.error("audit", OSError("disk full"))
    health.error("otel", ValueError("bad"))
    health.add_audit_dropped(3)
    health.add_span_export_failures(2)
    health.in_flight = 4
    depth = [7]
    health.gauges["audit_queue_depth"] = lambda: depth[0]
    health.gauges["broken"] = lambda: 1 / 0
    assert registry.get_sample_value("llmtap_internal_errors_total", {"stage": "audit"}) == 2
    assert registry.get_sample_value("llmtap_internal_errors_total", {"stage": "otel"}) == 1
    assert registry.get_sample_value("llmtap_audit_dropped_total") == 3
    assert registry.get_sample_value("llmtap_span_export_failures_total") == 2
    assert registry.get_sample_value("llmtap_in_flight_requests") == 4
    assert registry.get_sample_value("llmtap_audit_queue_depth") == 7
    depth[0] = 0
    assert registry.get_sample_value("llmtap_audit_queue_depth") == 0
    assert registry.get_sample_value("llmtap_broken") is None  # a failing gauge is skipped and counted
    assert health.internal_errors["metrics"] >= 1
    (info,) = [s for f in registry.collect() for s in f.samples if s.name == "llmtap_build_info"]
    assert info.value == 1 and set(info.labels) == {"version", "mitmproxy_version", "python_version"}


@pytest.mark.parametrize(
    "keys, names",
    [
        (["team"], ["label_team"]),
        (["key"], ["key_fingerprint"]),
        (["cost-center", "cost.center", "env"], ["label_cost_center", "label_env"]),
        (["9 lives", "key", "team"], ["label_9_lives", "key_fingerprint", "label_team"]),
    ],
)
def test_extra_label_names(keys: list[str], names: list[str]) -> None:
    assert [label.name for label in extra_labels(keys)] == names


def test_extra_labels_on_requests_tokens_and_cost() -> None:
    sink, registry, _ = make_sink(metric_labels=("team", "key"))
    sink.emit(record(labels={"team": "search"}, key_fingerprint="kf_abc123"))
    sink.emit(record())
    extra = {"label_team": "search", "key_fingerprint": "kf_abc123"}
    absent = {"label_team": "unknown", "key_fingerprint": "unknown"}
    for labels in (extra, absent):
        assert (
            registry.get_sample_value(
                "llmtap_requests_total", {**REQ, "status_code": "200", "stream": "false", **labels}
            )
            == 1
        )
        assert (
            registry.get_sample_value("llmtap_tokens_total", {"type": "input", **BY_MODEL, "app": "app1", **labels})
            == 12
        )
        assert (
            registry.get_sample_value(
                "llmtap_cost_usd_total", {**BY_MODEL, "app": "app1", "cost_source": "reported", **labels}
            )
            == 0.00066
        )
    assert label_values(registry, "label_team") == {"search", "unknown"}


def test_key_fingerprint_is_not_a_label_by_default() -> None:
    sink, registry, _ = make_sink()
    sink.emit(record(key_fingerprint="kf_abc123", labels={"team": "search"}))
    assert label_values(registry, "key_fingerprint") == set()
    assert label_values(registry, "label_team") == set()


def test_ten_thousand_distinct_values_do_not_grow_series_past_the_cap() -> None:
    """Adversarial: every record brings a new Pulze-Labels value, model, app, provider and key."""
    limit, n = 20, 10_000

    def hostile(i: int) -> ExchangeRecord:
        return record(
            labels={"team": f"team-{i}"},
            request_model=f"req-{i}",
            response_model=f"model-{i}",
            provider=f"prov-{i}",
            app_id=f"app-{i}",
            key_fingerprint=f"kf_{i}",
            score=0.5,
            upstream_latency_s=0.2,
            retries=1,
            stream=True,
            first_token_at=1000.1,
        )

    sink, registry, health = make_sink(label_limit=limit, metric_labels=("team", "key"))
    for i in range(limit + 1):  # every cap is full and "other" exists
        sink.emit(hostile(i))
        sink.passthrough(f"VERB{i}")
    at_cap = series_count(registry)
    for i in range(limit + 1, n):
        sink.emit(hostile(i))
        sink.passthrough(f"VERB{i}")
    assert series_count(registry) == at_cap
    for label in (
        "label_team",
        "key_fingerprint",
        "request_model",
        "response_model",
        "provider",
        "app",
        "gen_ai_request_model",
        "gen_ai_response_model",
        "gen_ai_provider_name",
        "method",
    ):
        values = label_values(registry, label)
        assert len(values) <= limit + 1 and "other" in values, label
    for label in ("label_team", "key_fingerprint", "request_model", "response_model", "provider", "app", "method"):
        assert health.label_overflow[label] == n - limit
        assert registry.get_sample_value("llmtap_label_overflow_total", {"label": label}) == n - limit
    total = sum(s.value for f in registry.collect() for s in f.samples if s.name == "llmtap_requests_total")
    assert total == n


def test_long_label_values_are_truncated() -> None:
    sink, registry, _ = make_sink()
    sink.emit(record(response_model="m" * 5000))
    assert {len(v) for v in label_values(registry, "response_model")} == {200}


def test_http_endpoint_binds_serves_and_releases_its_port() -> None:
    sink, _, _ = make_sink()
    assert sink.port is None  # -1 disables the endpoint
    sink.close()

    registry, health = CollectorRegistry(), Health()
    sink = MetricsSink(Settings(metrics_port=0, metrics_host="127.0.0.1"), health, registry=registry)
    try:
        assert sink.port and sink.port > 0
        sink.emit(record())
        body = urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/metrics", timeout=5).read().decode()
        assert 'llmtap_requests_total{app="app1"' in body
        assert "_created" not in body  # Prometheus would store each as a series of its own
    finally:
        sink.close()
    sink.close()  # idempotent
    again = MetricsSink(Settings(metrics_port=sink.port), Health(), registry=CollectorRegistry())
    again.close()  # close() released the port: a restarted sink binds it again


def test_fresh_registry_per_sink() -> None:
    """Two sinks in one process (tests, reloads) must not collide on metric names."""
    MetricsSink(Settings(metrics_port=-1), Health())
    # on a shared registry, registering the same metric names again raises ValueError
    MetricsSink(Settings(metrics_port=-1), Health())
