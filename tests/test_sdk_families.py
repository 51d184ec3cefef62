"""Every family end to end: official SDKs and curl through a real ``llmtap run`` to the simulator.

The SDKs run from their own venv (``sdk_python``; see conftest). Each test compares what the
SDK handed the app and what the simulator sent with the record, in all four places a record
goes: the JSON lines, the audit database (after the writer stopped), ``/metrics`` and the spans
an OTLP receiver decoded.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from audit_helpers import db_rows
from conftest import API_KEY, TapProcess, run_sdk, start_tap, wait_until
from otlp_receiver import OTLPHTTPReceiver, ReceivedSpan

from llmtap.devtools.simulator import Simulator
from llmtap.record import FIELD_NAMES, RECORD_SCHEMA, ExchangeRecord

SDK_KEY = "sk-sdk-SECRET-0123456789abcdef"  # tests/sdk_client.py's key


@pytest.fixture
def receiver() -> Iterator[OTLPHTTPReceiver]:
    with OTLPHTTPReceiver() as found:
        yield found


@pytest.fixture
def ftap(tmp_path: Path, simulator: Simulator, receiver: OTLPHTTPReceiver) -> Iterator[TapProcess]:
    """llmtap with every sink on: JSON lines, audit DB (whose writer exports the spans), /metrics."""
    proc = start_tap(tmp_path, simulator.url, "--otlp-endpoint", receiver.traces_url)
    yield proc
    proc.stop()


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--noproxy", "*", "--max-time", "20", *args], capture_output=True, timeout=30)


def by_response_id(records: list[ExchangeRecord], response_id: str) -> list[ExchangeRecord]:
    return [r for r in records if r.response_id == response_id]


def check_sinks_agree(tap: TapProcess, receiver: OTLPHTTPReceiver, records: list[ExchangeRecord]) -> None:
    """The DB rows, spans and token metrics say what the JSON lines say; no key anywhere."""
    metrics_text = _metrics(tap)
    for token_type, field in (
        ("input", "input_tokens"),
        ("output", "output_tokens"),
        ("cached_input", "cached_input_tokens"),
        ("cache_write", "cache_write_input_tokens"),
        ("reasoning", "reasoning_tokens"),
    ):
        expected = sum(getattr(r, field) or 0 for r in records)
        # the JSON line is written just before the metrics are counted: wait for them (bounded)
        wait_until(lambda: tap.metric("llmtap_tokens_total", type=token_type) == expected, timeout=5)
    spans = {s.span_id: s for s in receiver.wait_spans(len(records), timeout=20)}
    for record in records:
        _check_span(spans[record.span_id], record)
    tap.stop()
    rows = {row["exchange_id"]: row for row in db_rows(tap.db)}
    for record in records:
        row = rows[record.exchange_id]
        for name in FIELD_NAMES:
            value = getattr(record, name)
            if name in ("input_messages", "output_messages", "metadata") or value is None:
                continue
            if isinstance(value, tuple):
                assert json.loads(row[name]) == list(value), name
            elif isinstance(value, bool):
                assert row[name] == int(value), name
            else:
                assert row[name] == value, name
    for path in (tap.db, tap.jsonl, tap.log):
        assert SDK_KEY.encode() not in path.read_bytes() and API_KEY.encode() not in path.read_bytes()
    assert SDK_KEY.encode() not in receiver.raw_bytes() and SDK_KEY not in metrics_text


def _metrics(tap: TapProcess) -> str:
    import urllib.request

    with urllib.request.urlopen(tap.metrics_url, timeout=5) as response:
        return response.read().decode()


def _check_span(span: ReceivedSpan, record: ExchangeRecord) -> None:
    attributes = span.attributes
    for key, value in (
        ("gen_ai.operation.name", record.operation),
        ("gen_ai.request.model", record.request_model),
        ("gen_ai.response.model", record.response_model),
        ("gen_ai.response.id", record.response_id),
        ("gen_ai.usage.input_tokens", record.input_tokens),
        ("gen_ai.usage.output_tokens", record.output_tokens),
        ("gen_ai.usage.cache_read.input_tokens", record.cached_input_tokens),
        ("gen_ai.usage.cache_creation.input_tokens", record.cache_write_input_tokens),
        ("gen_ai.usage.reasoning.output_tokens", record.reasoning_tokens),
    ):
        assert attributes.get(key) == value, key


# --- OpenAI Responses ---------------------------------------------------------------------------


def test_openai_responses_plain_and_streamed(sdk_python, ftap, simulator, receiver) -> None:
    plain = run_sdk(sdk_python, "responses_create", ftap.proxy_url)
    streamed = run_sdk(sdk_python, "responses_stream", ftap.proxy_url)
    records = ftap.wait_records(2)
    [one] = by_response_id(records, plain["id"])
    [two] = by_response_id(records, streamed["id"])
    sent = {ex.request_id: ex for ex in simulator.exchanges}
    sim_plain = next(ex.response_json for ex in sent.values() if not ex.stream)
    sim_final = next(ex.stream_events[-1]["response"] for ex in sent.values() if ex.stream)

    usage = plain["usage"]
    assert usage == {**sim_plain["usage"], "input_tokens_details": {**usage["input_tokens_details"]}}
    assert (one.family, one.operation, one.method, one.stream) == ("openai_responses", "chat", "POST", False)
    assert (one.input_tokens, one.output_tokens, one.total_tokens) == (
        14,
        usage["output_tokens"],
        14 + usage["output_tokens"],
    )
    assert one.input_tokens == usage["input_tokens"] and one.total_tokens == usage["total_tokens"]
    assert one.cached_input_tokens == usage["input_tokens_details"]["cached_tokens"] == 7
    assert one.cache_write_input_tokens == 0 and one.reasoning_tokens == 0
    assert (one.request_model, one.response_model) == ("gpt-4o-mini", plain["model"])
    assert (one.previous_response_id, one.response_status, one.response_object) == (
        "resp_earlier1",
        "completed",
        "response",
    )
    assert (one.tool_count, one.tool_types, one.tool_names) == (1, ("function",), ("lookup",))
    assert (one.max_tokens, one.temperature, one.top_p) == (400, 0.3, 0.9)
    assert one.created_at == sim_plain["created_at"] and one.http_status == 200 and one.error_type is None
    expected_cost = ((14 - 7) * 0.15 + 7 * 0.075 + usage["output_tokens"] * 0.60) / 1e6
    assert one.cost_source == "database" and one.cost_usd == pytest.approx(expected_cost)
    assert one.record_schema == RECORD_SCHEMA and one.key_fingerprint.startswith("fp_")

    deltas = streamed["events"].count("response.output_text.delta")
    assert (two.stream, two.chunk_count, two.response_status) == (True, deltas, "completed")
    assert two.first_token_at is not None and two.first_token_at <= two.response_end
    assert two.input_tokens == sim_final["usage"]["input_tokens"] == streamed["usage"]["input_tokens"]
    assert two.output_tokens == streamed["usage"]["output_tokens"] and two.reasoning_tokens == 70
    assert two.output_tokens > two.reasoning_tokens  # output includes the reasoning
    check_sinks_agree(ftap, receiver, [one, two])


def test_background_response_is_billed_once_by_the_poll_that_finds_it_finished(
    sdk_python, ftap, simulator, receiver
) -> None:
    out = run_sdk(sdk_python, "responses_background", ftap.proxy_url)
    assert out["statuses"] == ["queued", "in_progress", "completed", "completed", "completed"]
    records = ftap.wait_records(2)
    wait_until(lambda: ftap.metric("llmtap_passthrough_requests_total", method="GET") == 3)
    assert len(ftap.records()) == 2  # one POST, one billing GET; the other three polls passed through
    post, poll = sorted(by_response_id(records, out["id"]), key=lambda r: r.method != "POST")
    assert (post.method, post.response_status, post.background) == ("POST", "queued", True)
    assert post.input_tokens is None and post.cost_usd is None and post.cost_source == "deferred"
    assert (poll.method, poll.response_status, poll.background) == ("GET", "completed", True)
    assert poll.path == f"/v1/responses/{out['id']}"
    assert poll.request_model == post.request_model == "gpt-4o-mini"  # carried over from the POST
    assert poll.input_tokens == out["usage"]["input_tokens"] and poll.output_tokens == out["usage"]["output_tokens"]
    assert poll.cost_source == "database" and poll.cost_usd > 0
    assert ftap.metric("llmtap_unpriced_requests_total") == 0  # deferred is not unknown
    check_sinks_agree(ftap, receiver, [post, poll])


# --- embeddings and Azure OpenAI ------------------------------------------------------------------


def test_embeddings_and_azure_openai(sdk_python, ftap, simulator, receiver) -> None:
    embedded = run_sdk(sdk_python, "embeddings_create", ftap.proxy_url)
    azure = run_sdk(sdk_python, "azure_chat", ftap.proxy_url)
    records = ftap.wait_records(4)
    families = sorted((r.family, r.operation, r.stream) for r in records)
    assert families == [
        ("azure_openai", "chat", False),
        ("azure_openai", "chat", True),
        ("azure_openai", "embeddings", False),
        ("embeddings", "embeddings", False),
    ]
    [emb] = [r for r in records if r.family == "embeddings"]
    assert (emb.input_count, emb.dimensions, emb.request_model) == (2, 8, "text-embedding-3-small")
    assert emb.input_tokens == embedded["usage"]["prompt_tokens"] and emb.output_tokens == 0
    # on 127.0.0.1 nothing says who served, and the price data needs the provider for this name:
    # unknown, not a guess (from api.openai.com it is priced: test_family_openai)
    assert emb.cost_source == "unknown" and emb.cost_usd is None
    assert emb.response_format == "base64"  # the openai SDK's default encoding

    [plain] = by_response_id(records, azure["plain"]["id"])
    assert plain.path == "/openai/deployments/my-gpt4o-mini/chat/completions"
    assert (plain.provider, plain.request_model, plain.max_tokens) == ("azure", "my-gpt4o-mini", 20)
    assert plain.api_version == "2024-10-21"
    assert plain.input_tokens == azure["plain"]["usage"]["prompt_tokens"]
    [streamed] = [r for r in records if r.family == "azure_openai" and r.stream]
    assert streamed.input_tokens == azure["stream_usage"]["prompt_tokens"]  # include_usage asked for it
    assert streamed.output_tokens == azure["stream_usage"]["completion_tokens"]
    [azure_emb] = [r for r in records if r.family == "azure_openai" and r.operation == "embeddings"]
    assert azure_emb.input_tokens == azure["embeddings_usage"]["prompt_tokens"] and azure_emb.input_count == 1
    spans = {s.span_id: s for s in receiver.wait_spans(4, timeout=20)}
    assert spans[plain.span_id].attributes["gen_ai.provider.name"] == "azure.ai.openai"
    check_sinks_agree(ftap, receiver, records)


def test_azure_deployment_names_the_model_and_openai_streams_carry_usage_only_when_asked(ftap, simulator) -> None:
    body = {"messages": [{"role": "user", "content": "no model in the body"}], "stream": True}
    out = curl(
        f"{ftap.proxy_url}/openai/deployments/prod-chat/chat/completions?api-version=2024-10-21",
        "-H", f"api-key: {API_KEY}", "-H", "Content-Type: application/json", "-d", json.dumps(body),
    )  # fmt: skip
    [record] = ftap.wait_records(1)
    assert out.stdout == simulator.exchanges[-1].response_body  # byte for byte
    assert b'"usage"' not in out.stdout  # no stream_options.include_usage: no usage, as OpenAI does
    assert (record.request_model, record.family, record.input_tokens, record.cost_source) == (
        "prod-chat",
        "azure_openai",
        None,
        "unknown",
    )
    assert record.key_fingerprint and record.chunk_count > 0


# --- OpenRouter -------------------------------------------------------------------------------------


@pytest.mark.parametrize("byok", [False, True])
def test_openrouter_reported_cost_and_byok(ftap, simulator, byok: bool) -> None:
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "route me"}]}
    headers = ["-H", f"Authorization: Bearer {API_KEY}", "-H", "Content-Type: application/json"]
    out = curl(
        f"{ftap.proxy_url}/api/v1/chat/completions",
        *headers,
        *(["-H", "X-Sim-BYOK: 1"] if byok else []),
        "-d",
        json.dumps(body),
    )
    [record] = ftap.wait_records(1)
    usage = json.loads(out.stdout)["usage"]
    assert out.stdout == simulator.exchanges[-1].response_body
    assert usage["is_byok"] is byok and record.router == "openrouter" and record.provider == "openai"
    expected = usage["cost"] + (usage["cost_details"]["upstream_inference_cost"] if byok else 0)
    assert record.cost_source == "reported" and record.cost_usd == pytest.approx(expected, abs=1e-9)
    metric = lambda: ftap.metric("llmtap_cost_usd_total", cost_source="reported")  # noqa: E731
    wait_until(lambda: metric() == pytest.approx(expected, abs=1e-9), 5)  # summed in nano-dollars


# --- raw bytes and faults, per family ------------------------------------------------------------------

RAW = [
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "raw", "stream": True}, {}),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "raw"}, {}),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "raw", "dimensions": 4}, {}),
    (
        "/api/v1/chat/completions",
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "raw"}], "stream": True},
        {},
    ),
]


@pytest.mark.parametrize("encoding", ["", "gzip"])
@pytest.mark.parametrize(
    "path, body, extra", RAW, ids=[f"{p}-{'stream' if b.get('stream') else 'plain'}" for p, b, _ in RAW]
)
def test_raw_bytes_pass_untouched(ftap, simulator, path, body, extra, encoding) -> None:
    headers = ["-H", f"Authorization: Bearer {API_KEY}", "-H", "Content-Type: application/json"]
    if encoding:
        headers += ["-H", f"X-Sim-Encoding: {encoding}"]
    out = curl(f"{ftap.proxy_url}{path}", *headers, "-d", json.dumps(body))
    [record] = ftap.wait_records(1)
    assert out.returncode == 0 and out.stdout == simulator.exchanges[-1].response_body
    assert record.input_tokens is not None and record.error_type is None


@pytest.mark.parametrize(
    "fault, error", [("stream-error", "stream_error"), ("failed", "response_failed"), ("truncate", None)]
)
def test_responses_stream_faults_keep_the_record(ftap, simulator, fault, error) -> None:
    body = {"model": "gpt-4o-mini", "input": "fault please", "stream": True}
    curl(f"{ftap.proxy_url}/v1/responses", "-H", f"Authorization: Bearer {API_KEY}", "-H", f"X-Sim-Fault: {fault}",
         "-H", "Content-Type: application/json", "-d", json.dumps(body))  # fmt: skip
    [record] = ftap.wait_records(1)
    assert record.family == "openai_responses" and record.stream
    if error:
        assert record.error_type == error and record.error_message
    else:  # cut mid-stream: the record exists, says the stream broke, and has no usage
        assert record.error_type is not None and record.input_tokens is None


def test_gemini_key_in_query_never_stored(ftap, simulator) -> None:
    secret = "AIzaSECRETgeminiKEY123456"
    body = {"contents": [{"role": "user", "parts": [{"text": "hello gemini"}]}]}
    out = curl(
        f"{ftap.proxy_url}/v1beta/models/gemini-2.5-flash:streamGenerateContent?key={secret}",
        "-H", "Content-Type: application/json", "-d", json.dumps(body),
    )  # fmt: skip
    [record] = ftap.wait_records(1)
    assert out.stdout == simulator.exchanges[-1].response_body  # the JSON-array stream, untouched
    assert record.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    ftap.stop()
    for path in (ftap.db, ftap.jsonl, ftap.log):
        assert secret.encode() not in path.read_bytes()


# --- Anthropic Messages and Gemini (the lead's parsers), through their official SDKs ---------------


def test_anthropic_sdk_create_and_stream_with_prompt_caching(sdk_python, ftap, simulator, receiver) -> None:
    out = run_sdk(sdk_python, "anthropic_calls", ftap.proxy_url)
    sent_version = subprocess.run(
        [sdk_python, "-c", "from anthropic._constants import ANTHROPIC_API_VERSION as v; print(v)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    records = ftap.wait_records(2)
    [created] = by_response_id(records, out["create"]["id"])
    [streamed] = by_response_id(records, out["stream"]["id"])
    for record, usage in ((created, out["create"]["usage"]), (streamed, out["stream"]["usage"])):
        reads, writes = usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"]
        assert record.family == "anthropic_messages" and record.provider == "anthropic"
        assert record.api_version == sent_version  # the anthropic SDK's anthropic-version header
        assert record.input_tokens == usage["input_tokens"] + reads + writes  # llmtap's input includes the cache
        assert (record.cached_input_tokens, record.cache_write_input_tokens) == (reads, writes)
        assert record.output_tokens == usage["output_tokens"]
        assert record.cache_write_1h_input_tokens in (0, None)
    assert created.cache_write_input_tokens == 100 and streamed.cached_input_tokens == 100  # written, then read
    plain_in = out["create"]["usage"]["input_tokens"]
    written_cost = (plain_in * 1.00 + 100 * 1.25 + created.output_tokens * 5.00) / 1e6  # 5-minute writes: 1.25x
    read_cost = (out["stream"]["usage"]["input_tokens"] * 1.00 + 100 * 0.10 + streamed.output_tokens * 5.00) / 1e6
    assert created.cost_usd == pytest.approx(written_cost) and streamed.cost_usd == pytest.approx(read_cost)
    assert streamed.stream and streamed.chunk_count and streamed.first_token_at is not None
    spans = {s.span_id: s for s in receiver.wait_spans(2, timeout=20)}
    assert spans[created.span_id].attributes["gen_ai.provider.name"] == "anthropic"
    check_sinks_agree(ftap, receiver, records)


def test_anthropic_error_event_inside_a_200_stream(ftap, simulator) -> None:
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    out = curl(
        f"{ftap.proxy_url}/v1/messages", "-H", f"x-api-key: {API_KEY}", "-H", "anthropic-version: 2023-06-01",
        "-H", "X-Sim-Fault: stream-error", "-H", "Content-Type: application/json", "-d", json.dumps(body),
    )  # fmt: skip
    [record] = ftap.wait_records(1)
    assert out.stdout == simulator.exchanges[-1].response_body and b"event: error" in out.stdout
    assert record.http_status == 200 and record.error_type == "stream_error"


def test_gemini_sdk_plain_and_streamed(sdk_python, ftap, simulator, receiver) -> None:
    out = run_sdk(sdk_python, "gemini_calls", ftap.proxy_url)
    records = ftap.wait_records(2)
    plain, streamed = sorted(records, key=lambda r: r.stream)
    for record, usage in ((plain, out["plain"]), (streamed, out["stream"])):
        assert record.family == "gemini" and record.request_model == "gemini-2.5-flash"
        assert record.input_tokens == usage["prompt_token_count"]
        thoughts = usage["thoughts_token_count"]
        assert record.output_tokens == usage["candidates_token_count"] + thoughts  # output includes thinking
        assert record.reasoning_tokens == thoughts
    assert streamed.stream and streamed.chunk_count == out["chunks"]
    spans = {s.span_id: s for s in receiver.wait_spans(2, timeout=20)}
    assert spans[plain.span_id].attributes["gen_ai.provider.name"] == "gcp.gemini"
    check_sinks_agree(ftap, receiver, records)


def test_family_map_reads_a_mapped_prefix_as_its_family(tmp_path, simulator) -> None:
    """``/openai/v1`` is Azure's by default; mapped to chat_completions it is read as plain OpenAI."""
    tap = start_tap(tmp_path, simulator.url, "--family-map", "/openai/v1=chat_completions")
    try:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "mapped"}]}
        out = curl(
            f"{tap.proxy_url}/openai/v1/chat/completions", "-H", f"api-key: {API_KEY}",
            "-H", "Content-Type: application/json", "-d", json.dumps(body),
        )  # fmt: skip
        [record] = tap.wait_records(1)
        assert out.stdout == simulator.exchanges[-1].response_body
        assert (record.family, record.provider) == ("chat_completions", None)
        assert record.input_tokens == json.loads(out.stdout)["usage"]["prompt_tokens"]
    finally:
        tap.stop()
    bad = subprocess.run(
        [*tap.args[:2], "--family-map", "host=nonsense", "--listen-port", "0", "--db", "", "--metrics-port", "-1"],
        capture_output=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert bad.returncode != 0 and b"nonsense" in bad.stdout + bad.stderr
