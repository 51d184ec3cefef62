-- llmtap's audit records in ClickHouse: a typed table, fed by a materialized view from the
-- log table that the OpenTelemetry Collector's ClickHouse exporter writes
-- (deploy/otel-collector-clickhouse.yml: database llmtap, table otel_logs).
--
-- Run once, after the Collector has started (it creates llmtap.otel_logs itself,
-- create_schema: true) and before llmtap sends records (a view only sees rows inserted after
-- it exists):
--
--     clickhouse-client --multiquery < deploy/clickhouse.sql
--
-- Duplicates: llmtap delivers each record at least once, so a record can arrive twice (after a
-- crash, or an answer lost on the way back). The table is a ReplacingMergeTree keyed on the
-- exchange id: copies of a record collapse into one row when ClickHouse merges parts, and a
-- query with FINAL (or a GROUP BY exchange_id) never counts one twice before that. Copies are
-- identical (same record, same values), so which one is kept does not matter. The partition is
-- the month of the request's own start time, which every copy shares.
--
-- Types: every llmtap attribute arrives as a string in LogAttributes (the exporter stores each
-- value with its text form). A missing attribute is NULL here, never 0: an unknown cost stays
-- unknown. Money is Decimal: from the row's exact integer nano-dollars (`cost_nanousd`) where it
-- has them, else parsed from the dollars' text, so sums are exact; `price_version` and
-- `price_model` say which price data and entry priced the row. Every attribute is also
-- kept whole in `attributes`, so a column not typed here is still queryable.
--
-- Checked here by running it in chDB (ClickHouse's engine in-process, tests/test_logexport.py);
-- no ClickHouse server or Collector binary could be run on the machines llmtap is built on.

CREATE DATABASE IF NOT EXISTS llmtap;

CREATE TABLE IF NOT EXISTS llmtap.exchanges
(
    exchange_id String,
    request_start DateTime64(6, 'UTC'),
    response_end Nullable(DateTime64(6, 'UTC')),
    duration_s Nullable(Float64),
    ttft_s Nullable(Float64),
    operation LowCardinality(String),
    family LowCardinality(Nullable(String)),
    stream Bool,
    router LowCardinality(Nullable(String)),
    provider LowCardinality(Nullable(String)),
    upstream_host LowCardinality(Nullable(String)),
    http_status Nullable(UInt16),
    error_type LowCardinality(Nullable(String)),
    app_id Nullable(String),
    key_fingerprint Nullable(String),
    labels Map(String, String),
    request_model LowCardinality(Nullable(String)),
    response_model LowCardinality(Nullable(String)),
    served_namespace LowCardinality(Nullable(String)),
    input_tokens Nullable(Int64),
    output_tokens Nullable(Int64),
    total_tokens Nullable(Int64),
    cached_input_tokens Nullable(Int64),
    reasoning_tokens Nullable(Int64),
    cache_write_input_tokens Nullable(Int64),
    service_tier LowCardinality(Nullable(String)),
    cost_usd Nullable(Decimal(38, 12)),
    cost_prompt_usd Nullable(Decimal(38, 12)),
    cost_completion_usd Nullable(Decimal(38, 12)),
    cost_source LowCardinality(String),
    cost_nanousd Nullable(Int64),
    price_version LowCardinality(Nullable(String)),
    price_model LowCardinality(Nullable(String)),
    cost_savings_usd Nullable(Decimal(38, 12)),
    trace_id String,
    span_id String,
    row_hash String,
    prev_hash String,
    service_name LowCardinality(String),
    attributes Map(LowCardinality(String), String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(request_start)
ORDER BY exchange_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS llmtap.exchanges_from_otel_logs TO llmtap.exchanges AS
SELECT
    LogAttributes['llmtap.exchange_id'] AS exchange_id,
    toDateTime64(Timestamp, 6, 'UTC') AS request_start,
    toDateTime64OrNull(nullIf(LogAttributes['llmtap.response_end'], ''), 6, 'UTC') AS response_end,
    toFloat64OrNull(LogAttributes['llmtap.duration_s']) AS duration_s,
    toFloat64OrNull(LogAttributes['llmtap.ttft_s']) AS ttft_s,
    LogAttributes['llmtap.operation'] AS operation,
    nullIf(LogAttributes['llmtap.family'], '') AS family,
    LogAttributes['llmtap.stream'] IN ('1', 'true') AS stream,
    nullIf(LogAttributes['llmtap.router'], '') AS router,
    nullIf(LogAttributes['llmtap.provider'], '') AS provider,
    nullIf(LogAttributes['llmtap.upstream_host'], '') AS upstream_host,
    toUInt16OrNull(LogAttributes['llmtap.http_status']) AS http_status,
    nullIf(LogAttributes['llmtap.error_type'], '') AS error_type,
    nullIf(LogAttributes['llmtap.app_id'], '') AS app_id,
    nullIf(LogAttributes['llmtap.key_fingerprint'], '') AS key_fingerprint,
    JSONExtract(LogAttributes['llmtap.labels'], 'Map(String, String)') AS labels,
    nullIf(LogAttributes['llmtap.request_model'], '') AS request_model,
    nullIf(LogAttributes['llmtap.response_model'], '') AS response_model,
    nullIf(LogAttributes['llmtap.served_namespace'], '') AS served_namespace,
    toInt64OrNull(LogAttributes['llmtap.input_tokens']) AS input_tokens,
    toInt64OrNull(LogAttributes['llmtap.output_tokens']) AS output_tokens,
    toInt64OrNull(LogAttributes['llmtap.total_tokens']) AS total_tokens,
    toInt64OrNull(LogAttributes['llmtap.cached_input_tokens']) AS cached_input_tokens,
    toInt64OrNull(LogAttributes['llmtap.reasoning_tokens']) AS reasoning_tokens,
    toInt64OrNull(LogAttributes['llmtap.cache_write_input_tokens']) AS cache_write_input_tokens,
    nullIf(LogAttributes['llmtap.service_tier'], '') AS service_tier,
    -- the exact integer nano-dollars when the row has them, else the dollars' text
    if(
        LogAttributes['llmtap.cost_nanousd'] != '',
        toDecimal128OrNull(LogAttributes['llmtap.cost_nanousd'], 12) / 1000000000,
        toDecimal128OrNull(LogAttributes['llmtap.cost_usd'], 12)
    ) AS cost_usd,
    toDecimal128OrNull(LogAttributes['llmtap.cost_prompt_usd'], 12) AS cost_prompt_usd,
    toDecimal128OrNull(LogAttributes['llmtap.cost_completion_usd'], 12) AS cost_completion_usd,
    LogAttributes['llmtap.cost_source'] AS cost_source,
    toInt64OrNull(LogAttributes['llmtap.cost_nanousd']) AS cost_nanousd,
    nullIf(LogAttributes['llmtap.price_version'], '') AS price_version,
    nullIf(LogAttributes['llmtap.price_model'], '') AS price_model,
    toDecimal128OrNull(LogAttributes['llmtap.cost_savings_usd'], 12) AS cost_savings_usd,
    TraceId AS trace_id,
    SpanId AS span_id,
    LogAttributes['llmtap.row_hash'] AS row_hash,
    LogAttributes['llmtap.prev_hash'] AS prev_hash,
    ServiceName AS service_name,
    LogAttributes AS attributes
FROM llmtap.otel_logs
WHERE ScopeName = 'llmtap' AND LogAttributes['llmtap.exchange_id'] != '';

-- Spend by day and model, each exchange counted once (unknown costs are left out of the sum
-- and counted apart):
--
--     SELECT toDate(request_start) AS day, response_model,
--            count() AS exchanges, sum(cost_usd) AS usd, countIf(cost_usd IS NULL) AS unpriced
--     FROM llmtap.exchanges FINAL
--     GROUP BY day, response_model ORDER BY day, usd DESC;
