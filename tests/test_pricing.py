"""Prices: right or honestly unknown, exact, dated, with provenance (issue 14).

Expected amounts are computed by hand from the providers' list prices (USD per million tokens)
written out in each test; the database-wide check compares with genai-prices' own
``calc_price``, called directly.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from decimal import Decimal

import genai_prices
import pytest
from audit_helpers import db_rows
from click.testing import CliRunner
from conftest import start_tap, wait_until
from genai_prices import Usage, calc_price
from mitmproxy.test import taddons

from llmtap.audit.report import report, spend
from llmtap.audit.sqlite import connect_readonly, verify_chain
from llmtap.capture.addon import LLMTap
from llmtap.cli.prices import prices
from llmtap.config import Settings
from llmtap.health import Health
from llmtap.pricing.cost import Pricer, PricesFileError, resolve_cost, to_nano
from llmtap.pricing.database import PriceDatabase
from llmtap.protocols.chat_completions import with_stream_usage
from llmtap.record import ExchangeRecord
from llmtap.sinks.audit import AuditSink
from llmtap.tracing import span_attributes

DATABASE = Pricer.load()
T_2025 = datetime(2025, 9, 1, tzinfo=UTC).timestamp()


def nano(usd: str) -> int:
    """Hand-computed USD (as exact text) in nano-dollars."""
    return to_nano(Decimal(usd))


def priced(pricer: Pricer = DATABASE, **fields) -> dict:
    return resolve_cost({"request_start": T_2025, **fields}, pricer)


def assert_exact(result: dict, usd: str, source: str, model: str | None = None) -> None:
    """Exact to the nano-dollar (1e-9 USD), and the float is that amount, without noise."""
    assert result["cost_source"] == source, result
    assert result["cost_nanousd"] == nano(usd), result
    assert abs(Decimal(repr(result["cost_usd"])) - Decimal(usd)) < Decimal("1e-9")
    assert repr(result["cost_usd"]) == repr(float(Decimal(usd)))
    if model is not None:
        assert result["price_model"] == model


# --- every family, exact against hand-computed amounts ------------------------------------------


def test_pulze_reported_cost_is_kept_exactly() -> None:
    result = priced(reported_cost_usd=0.00066, input_tokens=23, output_tokens=10, response_model="openai/gpt-4o")
    assert_exact(result, "0.00066", "reported")
    assert "price_model" not in result  # the router's charge, not a price llmtap looked up


def test_openai_with_cached_tokens() -> None:
    # gpt-4o: input 2.50, cached input 1.25, output 10.00; 1,234 input of which 200 cached, 567 output
    usd = (1034 * Decimal("2.50") + 200 * Decimal("1.25") + 567 * Decimal(10)) / 10**6
    assert usd == Decimal("0.008505")
    result = priced(
        provider="openai", response_model="gpt-4o", input_tokens=1234, cached_input_tokens=200, output_tokens=567
    )
    assert_exact(result, "0.008505", "database", "openai/gpt-4o")
    assert result["price_version"] == f"genai-prices:{genai_prices.__version__}" == "genai-prices:0.0.61"
    assert result["cost_prompt_usd"] == 0.002835 and result["cost_completion_usd"] == 0.00567


def test_anthropic_cache_read_and_write_with_the_one_hour_split() -> None:
    # claude-sonnet-4-5: input 3, cache read 0.30 (0.1×), 5-minute write 3.75 (1.25×), 1-hour write
    # 6 (2×), output 15. input_tokens counts every input token: 1,000 plain + 3,000 read + 2,000
    # written (500 of them for an hour).
    usd = (1000 * 3 + 3000 * Decimal("0.3") + 1500 * Decimal("3.75") + 500 * 6 + 400 * 15) / Decimal(10**6)
    assert usd == Decimal("0.018525")
    fields = dict(
        provider="anthropic",
        response_model="claude-sonnet-4-5",
        input_tokens=6000,
        cached_input_tokens=3000,
        cache_write_input_tokens=2000,
        cache_write_1h_input_tokens=500,
        output_tokens=400,
    )
    assert_exact(priced(**fields), "0.018525", "database", "anthropic/claude-sonnet-4-5")
    # without the split every write is a 5-minute one: 1,000 × 3 + 3,000 × 0.3 + 2,000 × 3.75 + 400 × 15
    assert_exact(priced(**{**fields, "cache_write_1h_input_tokens": None}), "0.0174", "database")


def test_gemini_thinking_tokens_are_output_and_never_added_twice() -> None:
    # gemini-2.5-pro (≤ 200k input): input 1.25, cached 0.125, output 10 (thinking included).
    # output_tokens = 300 candidates + 700 thoughts; reasoning_tokens is part of it.
    usd = (8000 * Decimal("1.25") + 2000 * Decimal("0.125") + 1000 * 10) / 10**6
    assert usd == Decimal("0.02025")
    fields = dict(provider="gcp.gemini", response_model="gemini-2.5-pro", input_tokens=10_000, cached_input_tokens=2000)
    assert_exact(
        priced(**fields, output_tokens=1000, reasoning_tokens=700), "0.02025", "database", "google/gemini-2.5-pro"
    )
    assert priced(**fields, output_tokens=1000)["cost_nanousd"] == nano("0.02025")


def test_long_context_tier_applies_to_every_token_above_its_threshold() -> None:
    # claude-sonnet-4-5 above 200k input tokens: input 6, cache read 0.6, output 22.5
    long = priced(
        provider="anthropic",
        response_model="claude-sonnet-4-5",
        input_tokens=250_000,
        cached_input_tokens=50_000,
        output_tokens=1000,
    )
    assert_exact(long, str((200_000 * 6 + 50_000 * Decimal("0.6") + 1000 * Decimal("22.5")) / 10**6), "database")
    assert long["cost_nanousd"] == nano("1.2525")
    # exactly 200k is not above it: the base rates 3 and 15
    at_threshold = priced(
        provider="anthropic", response_model="claude-sonnet-4-5", input_tokens=200_000, output_tokens=1000
    )
    assert_exact(at_threshold, "0.615", "database")


def test_dated_price_on_both_sides_of_its_change() -> None:
    # o3: 10 / 40 until 2025-06-09, then 2 / 8 from 2025-06-10 (UTC)
    fields = dict(provider="openai", response_model="o3", input_tokens=1000, output_tokens=1000)
    before = datetime(2025, 6, 9, 23, 59, 59, tzinfo=UTC).timestamp()
    after = datetime(2025, 6, 10, tzinfo=UTC).timestamp()
    assert_exact(resolve_cost({**fields, "request_start": before}, DATABASE), "0.05", "database", "openai/o3")
    assert_exact(resolve_cost({**fields, "request_start": after}, DATABASE), "0.01", "database", "openai/o3")


# --- siblings never take their parent's price; the database's own answers ------------------------

USAGE = dict(input_tokens=1234, cached_input_tokens=200, output_tokens=567)


@pytest.mark.parametrize(
    "model, entry, usd",
    [
        # gpt-4.1-nano: 0.10 / cached 0.025 / 0.40, not gpt-4.1's 2 / 0.5 / 8 (20× more)
        ("gpt-4.1-nano", "openai/gpt-4.1-nano", "0.0003352"),
        # o1-mini: 1.10 / 0.55 / 4.40, not o1's 15 / 7.5 / 60
        ("o1-mini", "openai/o1-mini", "0.0037422"),
        # o1-pro: 150 / 600 (no cache discount: cached tokens at the input rate)
        ("o1-pro", "openai/o1-pro", "0.5253"),
        # gpt-3.5-turbo-16k: 3 / 4
        ("gpt-3.5-turbo-16k", "openai/gpt-3.5-turbo-16k", "0.00597"),
        # gpt-4-32k: 60 / 120
        ("gpt-4-32k", "openai/gpt-4-32k", "0.14208"),
        # the database files gpt-4-1106-preview under gpt-4-turbo: 10 / 30
        ("gpt-4-1106-preview", "openai/gpt-4-turbo", "0.02935"),
        # and gpt-4o-2024-05-13 under gpt-4o: 2.5 / 1.25 / 10 (genai-prices 0.0.61's answer)
        ("gpt-4o-2024-05-13", "openai/gpt-4o", "0.008505"),
    ],
)
def test_sibling_models_get_their_own_price(model, entry, usd) -> None:
    assert_exact(priced(provider="openai", response_model=model, **USAGE), usd, "database", entry)


MODEL_NAMES = [
    "gpt-4.1-nano", "o1-mini", "gpt-4-1106-preview", "o1-pro", "gpt-3.5-turbo-16k", "gpt-4-32k",
    "gpt-4o-2024-05-13", "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4-turbo", "gpt-4",
    "gpt-3.5-turbo", "o1", "o3", "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-5.1",
    "claude-3-haiku-20240307", "claude-3-5-haiku-latest", "claude-3-5-sonnet-20241022",
    "claude-3-7-sonnet-latest", "claude-sonnet-4-5", "claude-opus-4-1", "claude-opus-4-5", "claude-haiku-4-5",
    "gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.0-flash", "gemini-3-pro-preview", "deepseek-chat",
    "deepseek-reasoner", "mistral-large-latest", "mistral-medium-latest", "codestral-latest",
    "llama-3.3-70b-versatile", "acme-unreleased-model", "gpt-4.1-nano-2025-04-14",
]  # fmt: skip


@pytest.mark.parametrize("moment", [datetime(2025, 3, 1, tzinfo=UTC), datetime(2026, 1, 15, 12, tzinfo=UTC)])
def test_every_model_priced_as_genai_prices_own_calc_price_prices_it(moment) -> None:
    assert len(MODEL_NAMES) >= 30
    usage = Usage(input_tokens=1234, cache_read_tokens=200, output_tokens=567)
    priced_count = 0
    for name in MODEL_NAMES:
        got = resolve_cost({"request_start": moment.timestamp(), "response_model": name, **USAGE}, DATABASE)
        try:
            want = calc_price(usage, name, genai_request_timestamp=moment)
        except LookupError:
            assert got["cost_source"] == "unknown" and got["cost_usd"] is None, name
            continue
        priced_count += 1
        assert got["cost_source"] == "database", name
        assert got["cost_nanousd"] == to_nano(want.total_price), name
        assert got["price_model"] == f"{want.provider.id}/{want.model.id}", name
    assert priced_count >= 30


def test_a_model_in_no_source_is_unknown() -> None:
    result = priced(response_model="acme-unreleased-model", input_tokens=10, output_tokens=10)
    assert result["cost_usd"] is None and result["cost_nanousd"] is None and result["cost_source"] == "unknown"
    assert result["price_version"] == "genai-prices:0.0.61"  # which data had no price for it


def test_the_provider_scopes_the_match() -> None:
    # OpenAI sells no claude: scoped to OpenAI, it has no price
    assert priced(provider="openai", response_model="claude-sonnet-4-5", **USAGE)["cost_source"] == "unknown"
    assert priced(provider="anthropic", response_model="claude-sonnet-4-5", **USAGE)["price_model"] == (
        "anthropic/claude-sonnet-4-5"
    )
    # a provider the database does not know falls back to the database's model matching
    assert priced(provider="pulze", response_model="gpt-4o", **USAGE)["price_model"] == "openai/gpt-4o"


def test_a_service_tier_the_data_has_no_price_for_is_unknown(tmp_path) -> None:
    fields = dict(provider="openai", response_model="gpt-4o", input_tokens=1000, output_tokens=1000)
    assert priced(**fields, service_tier="default")["cost_source"] == "database"
    assert priced(**fields, service_tier="flex")["cost_source"] == "unknown"
    path = tmp_path / "prices.yaml"
    path.write_text("gpt-4o:\n  - {service_tier: flex, input: 1.25, output: 5}\n")
    flex = priced(Pricer.load(str(path)), **fields, service_tier="flex")
    assert_exact(flex, "0.00625", "user", "gpt-4o")


def test_auto_update_is_never_started() -> None:
    from genai_prices import data_snapshot, update_prices

    Pricer.load()
    assert update_prices._global_update_prices is None
    assert data_snapshot._custom_snapshot is None  # llmtap keeps its own snapshot object


# --- the user's prices ----------------------------------------------------------------------------


def test_a_prices_file_overrides_the_database_with_dates_providers_and_tiers(tmp_path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(
        """
gpt-4o:
  input: 2
  output: 8
  cache_read: 0.5
claude-sonnet-4-5:
  - provider: anthropic
    valid_to: 2025-10-01
    input: 3
    output: 15
    cache_read: 0.3
    cache_write: 3.75
    cache_write_1h: 6
    tiers:
      - {start: 200000, input: 6, output: 22.5}
  - provider: anthropic
    valid_from: 2025-10-01
    input: 2
    output: 10
acme-private-llm:
  input: 0.1
  output: 0.2
"""
    )
    pricer = Pricer.load(str(path))
    version = pricer.user.version
    assert version.startswith("user:") and len(version) == 5 + 12
    result = priced(pricer, response_model="gpt-4o", input_tokens=1000, cached_input_tokens=200, output_tokens=100)
    assert_exact(result, str((800 * 2 + 200 * Decimal("0.5") + 100 * 8) / 10**6), "user", "gpt-4o")
    assert result["price_version"] == version
    assert_exact(
        priced(pricer, response_model="acme-private-llm", input_tokens=10**6, output_tokens=10**6), "0.3", "user"
    )
    claude = dict(
        provider="anthropic",
        response_model="claude-sonnet-4-5",
        input_tokens=6000,
        cached_input_tokens=3000,
        cache_write_input_tokens=2000,
        cache_write_1h_input_tokens=500,
        output_tokens=400,
    )
    before = datetime(2025, 9, 30, 23, tzinfo=UTC).timestamp()
    after = datetime(2025, 10, 1, tzinfo=UTC).timestamp()
    assert_exact(resolve_cost({**claude, "request_start": before}, pricer), "0.018525", "user")
    # from October: 2 / 10, and no cache rates in that entry: cache tokens at the input rate
    assert_exact(
        resolve_cost({**claude, "request_start": after}, pricer), str((6000 * 2 + 400 * 10) / Decimal(10**6)), "user"
    )
    # a tier above 200k input tokens
    big = dict(provider="anthropic", response_model="claude-sonnet-4-5", input_tokens=300_000, output_tokens=1000)
    assert_exact(
        resolve_cost({**big, "request_start": before}, pricer),
        str((300_000 * 6 + 1000 * Decimal("22.5")) / 10**6),
        "user",
    )
    # another provider's claude is not this entry: the database prices it
    assert resolve_cost({**claude, "provider": "google", "request_start": before}, pricer)["cost_source"] == "database"


@pytest.mark.parametrize(
    "text, suffix, words",
    [
        ("gpt-4o:\n  input: 2.5\n", ".yaml", ["'gpt-4o'", "'output'"]),
        ('{"my-model": {"output": 1}}', ".json", ["'my-model'", "'input'"]),
        ("gpt-4o:\n  - {input: 1, output: 2}\n  - {input: 1}\n", ".yml", ["'gpt-4o' (entry 2)", "'output'"]),
        ("gpt-4o: {input: lots, output: 2}\n", ".yaml", ["'gpt-4o'", "'input'", "lots"]),
        ("gpt-4o: {input: 1, output: 2, tiers: [{input: 2}]}\n", ".yaml", ["'gpt-4o'", "tier 1", "'start'"]),
        ("gpt-4o: {input: 1, ouput: 2}\n", ".yaml", ["'gpt-4o'", "'ouput'"]),
        ("{not json", ".json", ["not valid JSON"]),
    ],
)
def test_a_malformed_prices_file_is_refused_naming_file_model_and_field(tmp_path, text, suffix, words) -> None:
    path = tmp_path / f"prices{suffix}"
    path.write_text(text)
    with pytest.raises(PricesFileError) as info:
        Pricer.load(str(path))
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_the_addon_refuses_a_malformed_prices_file(tmp_path) -> None:
    from mitmproxy.exceptions import OptionsError

    bad = tmp_path / "prices.json"
    bad.write_text('{"acme-llm": {"input": 1}}')
    addon = LLMTap()
    with taddons.context(addon) as tctx:
        with pytest.raises(OptionsError, match="model 'acme-llm': missing field 'output'"):
            tctx.configure(addon, llmtap_db="", llmtap_metrics_port=-1, llmtap_prices=str(bad))
        with pytest.raises(OptionsError, match="cannot read"):
            tctx.configure(addon, llmtap_prices=str(tmp_path / "absent.yaml"))


def test_llmtap_run_refuses_a_malformed_prices_file_at_start(tmp_path, simulator) -> None:
    bad = tmp_path / "prices.yaml"
    bad.write_text("acme-llm:\n  input: 1\n")
    with pytest.raises(RuntimeError) as info:
        tap = start_tap(tmp_path, simulator.url, "--prices", str(bad))
        tap.stop()
    message = str(info.value)
    assert str(bad) in message and "'acme-llm'" in message and "'output'" in message


def test_newer_data_in_genai_prices_own_format_loads_offline(tmp_path) -> None:
    # the shape of genai-prices' prices/data.json: providers, match clauses, dated prices
    data = [
        {
            "id": "openai",
            "name": "OpenAI",
            "api_pattern": "https://api\\.openai\\.com",
            "model_match": {"contains": "gpt"},
            "models": [
                {
                    "id": "gpt-4o",
                    "match": {"or": [{"equals": "gpt-4o"}, {"starts_with": "gpt-4o-2024"}]},
                    "prices": [
                        {"prices": {"input_mtok": 2.5, "cache_read_mtok": 1.25, "output_mtok": 10}},
                        {"constraint": {"start_date": "2026-12-01"}, "prices": {"input_mtok": 3, "output_mtok": 12}},
                    ],
                }
            ],
        }
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    pricer = Pricer.load(price_data=str(path))
    fields = dict(provider="openai", response_model="gpt-4o", input_tokens=1000, output_tokens=1000)
    december = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    november = datetime(2026, 11, 30, tzinfo=UTC).timestamp()
    new = resolve_cost({**fields, "request_start": december}, pricer)
    assert_exact(new, "0.015", "database", "openai/gpt-4o")
    assert new["price_version"].startswith("genai-prices-data:") and len(new["price_version"]) == 18 + 12
    assert_exact(resolve_cost({**fields, "request_start": november}, pricer), "0.0125", "database")
    assert priced(pricer, **{**fields, "response_model": "gpt-4o-mini"})["cost_source"] == "unknown"  # not in it
    # the bundled data is untouched
    assert PriceDatabase.bundled().match("openai", "gpt-4o").prices_at(datetime.now(UTC)).input_mtok == Decimal("2.5")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "x"}]')
    with pytest.raises(ValueError):
        Pricer.load(price_data=str(bad))


# --- provenance on every record, span and JSON line -------------------------------------------------


def test_provenance_reaches_the_record_the_json_line_and_the_span() -> None:
    fields = dict(
        exchange_id="x",
        operation="chat",
        method="POST",
        path="/v1/chat/completions",
        request_start=T_2025,
        provider="openai",
        response_model="gpt-4o",
        input_tokens=1234,
        cached_input_tokens=200,
        output_tokens=567,
        service_tier="default",
    )
    record = ExchangeRecord.from_fields({**fields, **resolve_cost(fields, DATABASE)})
    line = record.to_json()
    assert '"cost_usd":0.008505,' in line and '"cost_nanousd":8505000,' in line
    assert '"cost_source":"database"' in line and '"price_model":"openai/gpt-4o"' in line
    assert '"price_version":"genai-prices:0.0.61"' in line
    attributes = span_attributes(record, capture_content=False)
    assert attributes["llmtap.price_version"] == "genai-prices:0.0.61"
    assert attributes["llmtap.price_model"] == "openai/gpt-4o"
    assert attributes["llmtap.cost_nanousd"] == 8_505_000 and attributes["pulze.cost_source"] == "database"


# --- stream usage injection -------------------------------------------------------------------------


def test_with_stream_usage_adds_the_option_only_where_it_lacks() -> None:
    body = b'{"model":"gpt-4o","stream":true,"messages":[]}'
    changed = with_stream_usage(body)
    assert json.loads(changed) == {**json.loads(body), "stream_options": {"include_usage": True}}
    assert changed.endswith(body[1:])  # the app's bytes follow unchanged
    assert json.loads(with_stream_usage(b'{"stream": true}')) == {
        "stream_options": {"include_usage": True},
        "stream": True,
    }
    merged = with_stream_usage(b'{"stream":true,"stream_options":{"x":1}}')
    assert json.loads(merged)["stream_options"] == {"x": 1, "include_usage": True}
    for untouched in (
        b'{"model":"gpt-4o","messages":[]}',  # not streamed
        b'{"stream":false}',
        b'{"stream":true,"stream_options":{"include_usage":false}}',  # the app decided
        b'{"stream":true,"stream_options":{"include_usage":true}}',
        b"not json",
        b"",
    ):
        assert with_stream_usage(untouched) is None


def _stream(tap, model: str) -> None:
    client = tap.client()
    try:
        chunks = list(
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "count the tokens please"}],
                stream=True,
                extra_headers={"X-Sim-Metadata": "none"},
            )
        )
        assert chunks
    finally:
        client.close()


def test_inject_stream_usage_prices_streams_that_would_be_unknown(tmp_path, simulator) -> None:
    simulator.record_exchanges = True
    (tmp_path / "off").mkdir()
    plain = start_tap(tmp_path / "off", simulator.url)
    try:
        _stream(plain, "gpt-4o-mini")
        (off,) = plain.wait_records(1)
    finally:
        plain.stop()
    assert off.input_tokens is None and off.cost_usd is None and off.cost_source == "unknown"  # never $0
    (tmp_path / "on").mkdir()
    injecting = start_tap(tmp_path / "on", simulator.url, "--inject-stream-usage")
    try:
        _stream(injecting, "gpt-4o-mini")
        (on,) = injecting.wait_records(1)
    finally:
        injecting.stop()
    sent = json.loads(simulator.exchanges[-1].request_body)
    assert sent["stream_options"] == {"include_usage": True}
    # gpt-4o-mini: 0.15 in, 0.60 out
    want = (on.input_tokens * Decimal("0.15") + on.output_tokens * Decimal("0.60")) / 10**6
    assert on.cost_source == "database" and on.cost_nanousd == to_nano(want) and on.price_model == "openai/gpt-4o-mini"


# --- end to end: unknown is NULL, absent from USD counters, counted, listed; metrics agree -------------


def test_unknown_database_and_reported_costs_end_to_end(tmp_path, simulator) -> None:
    tap = start_tap(tmp_path, simulator.url)
    client = tap.client()
    try:
        plain = {"X-Sim-Metadata": "none"}
        for model, headers in (
            ("llama-3-8b-instruct", plain),  # served as meta/llama-3-8b-instruct: in no source
            ("gpt-4o-mini", plain),  # priced from the database
            ("gpt-4o", plain),
            ("gpt-4o", {}),  # Pulze reports its cost
        ):
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "price me"}], extra_headers=headers
            )
        records = {(r.response_model, r.cost_source): r for r in tap.wait_records(4)}
        wait_until(lambda: tap.metric("llmtap_requests_total") >= 4)
        unpriced = tap.metric("llmtap_unpriced_requests_total", response_model="meta/llama-3-8b-instruct")
        llama_usd = tap.metric("llmtap_cost_usd_total", response_model="meta/llama-3-8b-instruct")
        metric_total = tap.metric("llmtap_cost_usd_total")
        by_source = {s: tap.metric("llmtap_cost_usd_total", cost_source=s) for s in ("database", "reported", "user")}
    finally:
        client.close()
        assert tap.stop() == 0
    llama = records[("meta/llama-3-8b-instruct", "unknown")]
    assert llama.cost_usd is None and llama.input_tokens is not None
    mini = records[("openai/gpt-4o-mini", "database")]
    assert mini.cost_nanousd == to_nano(
        (mini.input_tokens * Decimal("0.15") + mini.output_tokens * Decimal("0.6")) / 10**6
    )
    assert ("openai/gpt-4o", "reported") in records and ("openai/gpt-4o", "database") in records
    assert unpriced == 1 and llama_usd == 0

    conn = connect_readonly(tap.db)
    try:
        rows = {r["exchange_id"]: r for r in db_rows(tap.db)}
        assert verify_chain(conn).ok
        _, totals = spend(conn, [], None, None)
    finally:
        conn.close()
    row = rows[llama.exchange_id]
    assert row["cost_usd"] is None and row["cost_nanousd"] is None and row["cost_source"] == "unknown"
    assert rows[mini.exchange_id]["price_model"] == "openai/gpt-4o-mini"
    assert rows[mini.exchange_id]["price_version"] == "genai-prices:0.0.61"
    # metrics and audit agree: the exact sum of the rows is what the counters added up
    exact = sum(r["cost_nanousd"] for r in rows.values() if r["cost_nanousd"] is not None)
    assert totals["cost_nanousd"] == exact and totals["cost_usd"] == exact / 1e9
    assert metric_total == pytest.approx(exact / 1e9, rel=1e-12)
    assert by_source["database"] + by_source["reported"] == pytest.approx(metric_total, rel=1e-12)
    assert by_source["user"] == 0

    out = json.loads(CliRunner().invoke(report, ["--db", str(tap.db), "--format", "json"]).output)
    assert out["unpriced"] == [{"model": "meta/llama-3-8b-instruct", "provider": "meta", "requests": 1}]
    table = CliRunner().invoke(report, ["--db", str(tap.db)]).output
    assert "Cost unknown" in table and "meta/llama-3-8b-instruct" in table


# --- re-pricing without rewriting history ----------------------------------------------------------------


def test_reprice_shows_current_prices_at_each_exchanges_time_and_modifies_nothing(tmp_path) -> None:
    db = tmp_path / "llmtap.db"
    sink = AuditSink(Settings(db=str(db)), Health())
    before = datetime(2025, 6, 9, 12, tzinfo=UTC).timestamp()
    after = datetime(2025, 6, 11, 12, tzinfo=UTC).timestamp()
    base = dict(operation="chat", method="POST", path="/v1/chat/completions", provider="openai")
    records = [
        # an old row, priced by the former built-in table (o3 was not in it): unknown then
        ExchangeRecord(exchange_id="a", request_start=before, response_model="o3", input_tokens=1000, output_tokens=1000, cost_source="unknown", **base),
        # an old row with the former built-in price of gpt-4.1 charged to gpt-4.1-nano
        ExchangeRecord(exchange_id="b", request_start=after, response_model="gpt-4.1-nano", input_tokens=10**6, output_tokens=0, cost_usd=2.0, cost_source="computed", **base),
        ExchangeRecord(exchange_id="c", request_start=after, response_model="o3", input_tokens=1000, output_tokens=1000, cost_usd=0.01, cost_nanousd=10_000_000, cost_source="database", **base),
        ExchangeRecord(exchange_id="d", request_start=after, response_model="acme-llm", input_tokens=5, output_tokens=5, **base),
    ]  # fmt: skip
    for record in records:
        sink.emit(record)
    sink.close()
    conn = sqlite3.connect(db)
    hashes = conn.execute("SELECT exchange_id, row_hash FROM exchanges ORDER BY id").fetchall()
    conn.close()

    result = CliRunner().invoke(report, ["--db", str(db), "--by", "model", "--reprice", "--format", "json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    rows = {row["model"]: row for row in out["rows"]}
    # o3: 0.05 before its price change, 0.01 after
    assert rows["o3"]["reprice_nanousd"] == nano("0.06") and rows["o3"]["reprice_unknown"] == 0
    assert rows["o3"]["cost_usd"] == 0.01 and rows["o3"]["unknown_cost"] == 1
    # gpt-4.1-nano: 1M input tokens at 0.10, recorded at 2.00
    assert rows["gpt-4.1-nano"]["reprice_usd"] == 0.1 and rows["gpt-4.1-nano"]["cost_usd"] == 2.0
    assert rows["acme-llm"]["reprice_unknown"] == 1 and rows["acme-llm"]["reprice_usd"] == 0
    assert out["totals"]["reprice_nanousd"] == nano("0.16") and out["totals"]["reprice_unknown"] == 1
    assert out["price_version"] == "genai-prices:0.0.61"
    table = CliRunner().invoke(report, ["--db", str(db), "--reprice"]).output
    assert "repriced USD" in table and "0.16" in table

    conn = sqlite3.connect(db)
    assert conn.execute("SELECT exchange_id, row_hash FROM exchanges ORDER BY id").fetchall() == hashes
    conn.close()


def test_report_sums_are_exact_in_nano_dollars(tmp_path) -> None:
    db = tmp_path / "llmtap.db"
    sink = AuditSink(Settings(db=str(db)), Health())
    base = dict(operation="chat", method="POST", path="/v1/chat/completions", request_start=T_2025)
    for i in range(1000):  # 1000 × 0.1 µUSD: a float sum drifts, the integer sum cannot
        sink.emit(ExchangeRecord(exchange_id=f"e{i}", cost_usd=1e-7, cost_nanousd=100, cost_source="database", **base))
    sink.close()
    out = json.loads(CliRunner().invoke(report, ["--db", str(db), "--format", "json"]).output)
    assert out["totals"]["cost_nanousd"] == 100_000 and out["totals"]["cost_usd"] == 0.0001
    assert sum([1e-7] * 1000) != 0.0001  # what summing the floats would have said


# --- llmtap prices ---------------------------------------------------------------------------------------


def test_llmtap_prices_shows_source_rates_and_version() -> None:
    runner = CliRunner()
    out = json.loads(runner.invoke(prices, ["o3", "--provider", "openai", "--at", "2025-06-09", "--json"]).output)
    assert out["source"] == "database" and out["price_model"] == "openai/o3"
    assert out["usd_per_million_tokens"]["input"] == "10" and out["usd_per_million_tokens"]["output"] == "40"
    assert out["price_version"] == "genai-prices:0.0.61"
    assert [p.get("from") for p in out["periods"]] == [None, "2025-06-10"]
    later = json.loads(runner.invoke(prices, ["o3", "--at", "2025-06-10", "--json"]).output)
    assert later["usd_per_million_tokens"]["input"] == "2"
    text = runner.invoke(prices, ["claude-sonnet-4-5", "--provider", "anthropic"]).output
    assert "anthropic/claude-sonnet-4-5" in text and "6 above 200,000 input tokens" in text
    unknown = runner.invoke(prices, ["acme-unreleased-model"])
    assert unknown.exit_code == 1 and "unknown" in unknown.output
    version = runner.invoke(prices, [])
    assert version.exit_code == 0 and "genai-prices:0.0.61" in version.output
    assert "prices known to 2026-03-13" in version.output  # 0.0.61's latest dated change


def test_llmtap_prices_with_a_user_file(tmp_path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"gpt-4o": {"input": 1, "output": 2, "valid_from": "2025-01-01"}}))
    out = json.loads(CliRunner().invoke(prices, ["gpt-4o", "--prices", str(path), "--json"]).output)
    assert out["source"] == "user" and out["usd_per_million_tokens"]["input"] == "1"
    assert out["price_version"].startswith("user:") and out["valid_from"].startswith("2025-01-01")
    old = json.loads(
        CliRunner().invoke(prices, ["gpt-4o", "--prices", str(path), "--at", "2024-06-01", "--json"]).output
    )
    assert old["source"] == "database"  # before the user's period, the database's price


# --- the families' parsers feed the pricing as the record's token conventions say ---------------------


def _finished(family, body: dict, host: str) -> dict:
    from llmtap.protocols import registry

    fields = {"request_start": T_2025, "upstream_host": host, **family.response_fields(body, None)}
    registry.finish(fields, family, body, False)
    return fields


def test_an_anthropic_messages_body_is_priced_with_its_cache_split() -> None:
    from llmtap.protocols import anthropic_messages

    body = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "usage": {
            "input_tokens": 1000,  # Anthropic's count excludes the cache reads and writes
            "cache_read_input_tokens": 3000,
            "cache_creation_input_tokens": 2000,
            "cache_creation": {"ephemeral_5m_input_tokens": 1500, "ephemeral_1h_input_tokens": 500},
            "output_tokens": 400,
        },
    }
    fields = _finished(anthropic_messages.FAMILY, body, "api.anthropic.com")
    assert fields["input_tokens"] == 6000 and fields["provider"] == "anthropic"
    # the hand-computed amount of test_anthropic_cache_read_and_write_with_the_one_hour_split
    assert_exact(resolve_cost(fields, DATABASE), "0.018525", "database", "anthropic/claude-sonnet-4-5")


def test_a_gemini_body_is_priced_with_its_thinking_tokens_once() -> None:
    from llmtap.protocols import gemini

    body = {
        "candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}, "finishReason": "STOP"}],
        "modelVersion": "gemini-2.5-pro",
        "usageMetadata": {
            "promptTokenCount": 10_000,
            "cachedContentTokenCount": 2000,
            "candidatesTokenCount": 300,  # excludes the thoughts
            "thoughtsTokenCount": 700,
            "totalTokenCount": 11_000,
        },
    }
    fields = _finished(gemini.FAMILY, body, "generativelanguage.googleapis.com")
    assert fields["output_tokens"] == 1000 and fields["reasoning_tokens"] == 700
    assert_exact(resolve_cost(fields, DATABASE), "0.02025", "database", "google/gemini-2.5-pro")


def test_an_audit_log_of_an_older_llmtap_still_reports_and_reprices(tmp_path) -> None:
    from sqlite_utils import Database

    from llmtap.audit.sqlite import MIGRATIONS

    path = tmp_path / "old.db"
    db = Database(sqlite3.connect(path))
    for step in MIGRATIONS[:4]:  # the schema before cache writes, exact costs and provenance
        step(db)
    rows = [
        ("a", T_2025, "gpt-4.1-nano", "openai", 10**6, 0, 2.0, "computed"),  # the old table's 20× price
        ("b", T_2025, "gpt-4o", "openai", 1000, 100, 0.00030000000000000003, "computed"),
        ("c", T_2025, "acme-llm", None, 10, 10, None, "unknown"),
    ]
    for exchange_id, start, model, provider, tokens_in, tokens_out, cost, source in rows:
        db.execute(
            "INSERT INTO exchanges (exchange_id, request_start, response_model, provider, input_tokens, "
            "output_tokens, cost_usd, cost_source, prev_hash, row_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'p', 'r')",
            (exchange_id, start, model, provider, tokens_in, tokens_out, cost, source),
        )
    db.conn.commit()
    db.conn.close()
    conn = connect_readonly(path)  # read-only: nothing migrates the file
    try:
        _, totals = spend(conn, [], None, None, DATABASE)
        assert "cost_nanousd" not in {r[1] for r in conn.execute("PRAGMA table_info(exchanges)")}
    finally:
        conn.close()
    # the older rows' floats, summed as decimals: 2 + 0.0003 (its float noise dropped)
    assert totals["cost_usd"] == 2.0003 and totals["cost_nanousd"] == 2_000_300_000
    assert totals["unknown_cost"] == 1
    # today's prices: gpt-4.1-nano 0.10 per 1M input; gpt-4o 1000 × 2.5 + 100 × 10 per 1M
    assert totals["reprice_nanousd"] == nano("0.1") + nano("0.0035") and totals["reprice_unknown"] == 1


def test_a_prices_file_overrides_the_database_through_the_proxy(tmp_path, simulator) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("openai/gpt-4o-mini:\n  input: 1\n  output: 3\n")
    tap = start_tap(tmp_path, simulator.url, "--prices", str(path))
    client = tap.client()
    try:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "what does it cost"}],
            extra_headers={"X-Sim-Metadata": "none"},
        )
        (record,) = tap.wait_records(1)
        wait_until(lambda: tap.metric("llmtap_cost_usd_total", cost_source="user") > 0)
        metric = tap.metric("llmtap_cost_usd_total", cost_source="user")
    finally:
        client.close()
        assert tap.stop() == 0
    want = (record.input_tokens * 1 + record.output_tokens * 3) / Decimal(10**6)
    assert record.cost_source == "user" and record.cost_nanousd == to_nano(want)
    assert record.price_model == "openai/gpt-4o-mini" and record.price_version.startswith("user:")
    assert metric == record.cost_nanousd / 1e9
