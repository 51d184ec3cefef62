"""A real Prometheus scrapes a real llmtap proxy; its answers must equal what the simulator sent."""

from __future__ import annotations

import json
import math
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from conftest import TapProcess, start_tap, wait_until
from prom import PrometheusError, PrometheusServer, Sample
from prometheus_client.parser import text_string_to_metric_families

from llmtap.config import Settings
from llmtap.devtools.simulator import Simulator
from llmtap.health import Health
from llmtap.record import ExchangeRecord
from llmtap.sinks.metrics import MetricsSink

P95 = "histogram_quantile(0.95, sum by (le) (rate(gen_ai_client_operation_duration_seconds_bucket[1m])))"


def chat(client: openai.OpenAI, text: str, model: str = "pulze", **kwargs) -> None:
    """One chat exchange; streams are read to the end, errors are part of the traffic."""
    try:
        response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kwargs)
        if kwargs.get("stream"):
            for _ in response:
                pass
    except openai.APIStatusError:
        pass


def sent_totals(simulator: Simulator) -> dict[str, float]:
    """Requests, tokens and USD exactly as the simulator sent them (the last event for streams)."""
    totals = dict(requests=0, input=0, output=0, usd=0.0, savings=0.0, retries=0, streams=0, errors=0)
    for ex in simulator.exchanges:
        if not ex.path.endswith("completions"):
            continue
        totals["requests"] += 1
        totals["streams"] += ex.stream
        body = ex.stream_events[-1] if ex.stream else ex.response_json
        if ex.status != 200:
            totals["errors"] += 1
            continue
        usage, metadata = body["usage"], body["metadata"]
        totals["input"] += usage["prompt_tokens"]
        totals["output"] += usage["completion_tokens"]
        totals["usd"] += metadata["costs"]["total_tokens"]
        totals["savings"] += metadata["cost_savings"]["total_tokens"]
        totals["retries"] += metadata["retries"] or 0
    return totals


def test_prometheus_scrapes_what_the_simulator_sent(
    tmp_path: Path, simulator: Simulator, tap: TapProcess, openai_client: openai.OpenAI
) -> None:
    client = openai_client
    with PrometheusServer(tmp_path).start([f"127.0.0.1:{tap.metrics_port}"]) as prom:
        prom.wait_scraped()
        # One exchange first, so its series exist in an earlier scrape and rate() sees them grow.
        chat(client, "warm up")
        prom.wait_for("sum(llmtap_requests_total)", lambda s: s and s[0].value == 1)

        for i in range(6):
            chat(client, f"question {i} about routing", model="pulze" if i % 2 else "openai/gpt-4o-mini")
        for i in range(3):
            chat(client, f"stream {i}", stream=True)
        client.completions.create(model="pulze", prompt="complete this sentence")
        chat(client, "retried once", extra_headers={"X-Sim-Fault": "retry"})
        chat(client, "rate limited", extra_headers={"X-Sim-Fault": "429"})
        client.models.list()  # passed through, counted by method
        sent = sent_totals(simulator)
        assert sent["requests"] == 13 and sent["streams"] == 3 and sent["errors"] == 1 and sent["retries"] == 1

        prom.wait_for("sum(llmtap_requests_total)", lambda s: s and s[0].value == sent["requests"])
        assert prom.value('sum(llmtap_requests_total{status_code="429"})') == 1
        assert prom.value('sum(llmtap_requests_total{stream="true"})') == sent["streams"]
        assert prom.value('sum(llmtap_requests_total{operation="text_completion"})') == 1
        assert prom.value("sum(gen_ai_client_operation_duration_seconds_count)") == sent["requests"]
        assert prom.value('sum(gen_ai_client_operation_duration_seconds_count{error_type="http_429"})') == 1
        assert prom.value("sum(gen_ai_client_operation_time_to_first_chunk_seconds_count)") == sent["streams"]
        assert prom.value('sum(llmtap_errors_total{error_type="http_429"})') == 1
        for token_type in ("input", "output"):
            assert prom.value(f'sum(llmtap_tokens_total{{type="{token_type}"}})') == sent[token_type]
            assert (
                prom.value(f'sum(gen_ai_client_token_usage_sum{{gen_ai_token_type="{token_type}"}})')
                == sent[token_type]
            )
        assert prom.value("sum(llmtap_cost_usd_total)") == pytest.approx(sent["usd"], rel=1e-9)
        assert prom.value('sum(llmtap_cost_usd_total{cost_source="reported"})') == pytest.approx(sent["usd"], rel=1e-9)
        assert prom.value("sum(llmtap_cost_savings_usd_total)") == pytest.approx(sent["savings"], rel=1e-9)
        assert prom.value("sum(llmtap_unpriced_requests_total)") is None  # every success was priced
        assert prom.value("sum(llmtap_retries_total)") == sent["retries"]
        assert prom.value("sum(llmtap_routed_requests_total)") == sent["requests"] - sent["errors"]
        assert prom.value("sum(llmtap_upstream_latency_seconds_count)") == sent["requests"] - sent["errors"]
        assert prom.value("sum(llmtap_routing_score_count)") == sent["requests"] - sent["errors"]
        assert prom.value('llmtap_passthrough_requests_total{method="GET"}') == 1
        assert prom.value("llmtap_in_flight_requests") == 0
        assert prom.value("llmtap_build_info") == 1
        assert prom.value("sum(llmtap_internal_errors_total)") in (None, 0)

        p95 = prom.value(P95)
        assert p95 is not None and math.isfinite(p95) and p95 > 0


def test_hostile_labels_through_the_proxy_stay_under_the_cap(tmp_path: Path, simulator: Simulator) -> None:
    """Distinct Pulze-Labels values and model names per request: series stop growing at the cap."""
    limit, rounds = 4, 30
    tap = start_tap(tmp_path, simulator.url, "--metric-label", "team", "--label-limit", str(limit))
    client = tap.client()

    def hostile(i: int) -> None:
        # A named model keeps the served model fixed, so only the hostile values vary.
        chat(
            client,
            f"labelled {i}",
            model="openai/gpt-4o-mini",
            extra_headers={"Pulze-Labels": json.dumps({"team": f"team-{i}"})},
        )
        chat(client, f"unknown model {i}", model=f"no-such-model-{i}")  # a 404 with its own request model

    try:
        for i in range(limit + 1):  # every cap is full and "other" exists
            hostile(i)
        at_cap = scrape(tap, requests=2 * (limit + 1))
        for i in range(limit + 1, rounds):
            hostile(i)
        after = scrape(tap, requests=2 * rounds)
    finally:
        client.close()
        tap.stop()

    assert len(after) == len(at_cap), sorted(set(after) - set(at_cap))[:5]
    assert label_values(after, "label_team") == {*(f"team-{i}" for i in range(limit)), "other", "unknown"}
    request_models = label_values(after, "request_model")
    assert len(request_models) == limit + 1 and "other" in request_models
    assert after["llmtap_label_overflow_total", (("label", "label_team"),)] == rounds - limit
    # the named model took one of the request_model slots
    assert after["llmtap_label_overflow_total", (("label", "request_model"),)] == rounds + 1 - limit


def test_prometheus_helper_loads_rules_and_answers_range_queries(tmp_path: Path) -> None:
    """``PrometheusServer`` as the dashboards tests use it: rule files, alerts, range queries."""
    rules = tmp_path / "rules.yml"
    rules.write_text(
        json.dumps(
            {
                "groups": [
                    {
                        "name": "t",
                        "rules": [
                            {"record": "llmtap:requests:sum", "expr": "sum(llmtap_requests_total)"},
                            {"alert": "AnyRequest", "expr": "sum(llmtap_requests_total) > 0"},
                        ],
                    }
                ]
            }
        )
    )
    sink = MetricsSink(Settings(metrics_port=0), Health())
    sink.emit(ExchangeRecord("x1", "chat", "POST", "/v1/chat/completions", request_start=1.0, response_end=1.2))
    try:
        with PrometheusServer(tmp_path).start([f"127.0.0.1:{sink.port}"], rule_files=[rules]) as prom:
            prom.wait_for("llmtap:requests:sum", lambda s: s and s[0].value == 1)
            assert [rule["health"] for group in prom.rules() for rule in group["rules"]] == ["ok", "ok"]
            assert wait_until(prom.alerts)[0]["labels"]["alertname"] == "AnyRequest"
            now = time.time()
            [series] = prom.query_range("sum(llmtap_requests_total)", now - 5, now)
            assert series["values"]
            assert prom.query("vector(2)") == [Sample({}, 2.0)] and prom.query("scalar(vector(3))")[0].value == 3
            with pytest.raises(PrometheusError, match="bad_data"):
                prom.query("sum(")
    finally:
        sink.close()


def test_missing_prometheus_fails_rather_than_skips(tmp_path: Path) -> None:
    with pytest.raises(PrometheusError, match="make test"):
        PrometheusServer(tmp_path, binary=str(tmp_path / "no-prometheus")).start(["127.0.0.1:1"])


Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def label_values(series: Series, label: str) -> set[str]:
    return {dict(labels)[label] for _, labels in series if label in dict(labels)}


def scrape(tap: TapProcess, requests: int) -> Series:
    """Every series on /metrics (keyed by name and sorted labels), once ``requests`` are counted."""

    def series() -> Series | None:
        with urllib.request.urlopen(tap.metrics_url, timeout=10) as response:
            text = response.read().decode()
        found = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        counted = sum(value for (name, _), value in found.items() if name == "llmtap_requests_total")
        return found if counted == requests else None

    return wait_until(series, timeout=15)
