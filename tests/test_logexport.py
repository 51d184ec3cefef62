"""Audit rows as OTLP log records (``--otlp-logs``), delivered at least once.

Every record is decoded by a real OTLP receiver on loopback (``tests/otlp_receiver.py``, HTTP
and gRPC), and compared with the row the real audit writer process committed to SQLite. The
delivery tests take the collector away (nothing listening, then refusals, then a writer killed
while it waits for the answer) and check what arrived, what was acknowledged, and where the
store's cursor stood at every request.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sqlite3
import subprocess
import threading
from decimal import Decimal
from pathlib import Path

import openai
import pytest
import yaml
from audit_helpers import db_rows, make_record, new_sink, row_count
from conftest import API_KEY, LLMTAP, free_port, start_tap, wait_until
from otlp_receiver import OTLPGRPCReceiver, OTLPHTTPReceiver, ReceivedLog
from test_audit_journal import writer_pids
from test_audit_store import SECRET_ANSWER, SECRET_PROMPT, with_content

from llmtap.audit.logexport import EVENT_NAME, NOT_EXPORTED, LogExport, NotAcknowledged
from llmtap.audit.rows import as_hex
from llmtap.audit.sqlite import AuditStore
from llmtap.config import Settings, SettingsError
from llmtap.health import Health

PROMPT = "walrus-okapi-5521 describe the tangerine observatory"


def expected_attributes(row: dict, content: dict | None = None) -> dict:
    """What a record must carry: every non-NULL exported column, named llmtap.<column>, as stored
    (the chain's hashes as shown: ``sha256:<hex>``, whether stored as raw digests or text)."""
    attributes = {
        f"llmtap.{name}": "sha256:" + value.hex() if isinstance(value, bytes) else value
        for name, value in row.items()
        if value is not None and name not in NOT_EXPORTED
    }
    if content is not None:
        attributes["llmtap.input_messages"] = content["input_messages"]
        attributes["llmtap.output_messages"] = content["output_messages"]
        attributes["llmtap.content_truncated"] = bool(content["truncated"])
    return attributes


def by_exchange(records: list[ReceivedLog]) -> dict[str, ReceivedLog]:
    return {record.attributes["llmtap.exchange_id"]: record for record in records}


def cursor(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT last_id FROM log_export WHERE instance = 'local'").fetchone()
        return row[0] if row else 0
    finally:
        conn.close()


def check_record(record: ReceivedLog, row: dict, content: dict | None = None) -> None:
    assert record.event_name == EVENT_NAME
    assert record.attributes == expected_attributes(row, content)
    assert (record.trace_id, record.span_id) == (row["trace_id"], row["span_id"])
    assert record.time_ns == round(row["request_start"] * 1e9)
    failed = row["error_type"] is not None
    assert (record.severity_number, record.severity_text) == ((13, "WARN") if failed else (9, "INFO"))
    assert record.resource["service.name"] == "llmtap" and record.scope == "llmtap"


# --- through the writer process, hand-built records ------------------------------------------------


@pytest.fixture
def receiver():
    with OTLPHTTPReceiver() as r:
        yield r


def test_one_record_per_row_attributes_equal_the_row(tmp_path, receiver, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", receiver.logs_url)
    db = tmp_path / "llmtap.db"
    sink = new_sink(tmp_path, otlp_logs=True)
    records = [make_record(i) for i in range(30)]
    records[3] = records[3].replace(error_type="http_429", cost_usd=None, cost_source="unknown", input_tokens=None)
    try:
        for record in records:
            sink.emit(record)
        sink.flush()
        received = receiver.wait_logs(30)
    finally:
        sink.close()
    rows = db_rows(db)
    assert len(received) == len(rows) == 30  # one each, none twice
    got = by_exchange(received)
    for row in rows:
        check_record(got[row["exchange_id"]], row)
    unknown = got["ex-00003"].attributes
    assert "llmtap.cost_usd" not in unknown and unknown["llmtap.cost_source"] == "unknown"  # never a silent $0
    assert "llmtap.row_hash" in unknown and "llmtap.key_fingerprint" in unknown
    assert cursor(db) == rows[-1]["id"]


def test_content_only_with_the_opt_in(tmp_path, receiver, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)  # a base URL: /v1/logs is appended
    sink = new_sink(tmp_path, otlp_logs=True)
    for i in range(3):
        sink.emit(with_content(i))  # the sink strips the text: capture is off
    sink.close()
    receiver.wait_logs(3)
    assert SECRET_PROMPT.encode() not in receiver.raw_bytes() and SECRET_ANSWER.encode() not in receiver.raw_bytes()
    assert not any("llmtap.input_messages" in r.attributes for r in receiver.logs)

    with OTLPHTTPReceiver() as opted_in:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", opted_in.url)
        other = tmp_path / "content"
        other.mkdir()
        sink = new_sink(other, otlp_logs=True, capture_content=True)
        for i in range(3):
            sink.emit(with_content(i, cap=12))
        sink.close()
        received = by_exchange(opted_in.wait_logs(3))
    contents = {c["exchange_id"]: c for c in db_rows(other / "llmtap.db", "content")}
    for row in db_rows(other / "llmtap.db"):
        check_record(received[row["exchange_id"]], row, contents[row["exchange_id"]])
    [user] = [m for m in json.loads(received["ex-00000"].attributes["llmtap.input_messages"]) if m["role"] == "user"]
    assert SECRET_PROMPT.startswith(user["content"]) and user["truncated"]
    assert received["ex-00000"].attributes["llmtap.content_truncated"] is True


def test_grpc(tmp_path, monkeypatch):
    with OTLPGRPCReceiver() as grpc_receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", grpc_receiver.url)
        sink = new_sink(tmp_path, otlp_logs=True)
        for i in range(5):
            sink.emit(make_record(i))
        sink.close()
        received = by_exchange(grpc_receiver.wait_logs(5))
    for row in db_rows(tmp_path / "llmtap.db"):
        check_record(received[row["exchange_id"]], row)


def test_a_refused_batch_is_retried_smaller_and_the_cursor_waits(tmp_path, receiver, monkeypatch):
    """LogExport driven by hand: the cursor moves only past what the collector acknowledged."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", receiver.logs_url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT", "0.5")
    monkeypatch.setenv("OTEL_BLRP_MAX_EXPORT_BATCH_SIZE", "8")
    sink = new_sink(tmp_path)
    for i in range(20):
        sink.emit(make_record(i))
    sink.close()
    db = str(tmp_path / "llmtap.db")
    settings = Settings(db=db, otlp_logs=True)
    stores = []

    def open_store():
        stores.append(AuditStore(db, fsync_batch=False, capture_content=False))
        return stores[-1]

    refuse = {"ex-00010"}  # the collector refuses any request holding this record (row 11), for now
    receiver.on_logs = lambda records: not refuse & {r.attributes["llmtap.exchange_id"] for r in records}
    export = LogExport(settings, Health(), open_store, start=False)  # driven by hand
    outcomes = []
    try:
        for _ in range(9):
            try:
                outcomes.append((export.export_once(), cursor(tmp_path / "llmtap.db")))
            except NotAcknowledged:
                outcomes.append(("refused", cursor(tmp_path / "llmtap.db")))
        refuse.clear()  # the collector takes it now
        while outcomes[-1][0] != 0:
            outcomes.append((export.export_once(), cursor(tmp_path / "llmtap.db")))
    finally:
        export.close()
    assert len(stores) == 1
    assert outcomes == [
        (8, 8),  # rows 1-8
        ("refused", 8),  # 9-16
        ("refused", 8),  # 9-12: half the size
        (2, 10),  # 9-10
        ("refused", 10),  # 11-18: back to full size
        ("refused", 10),  # 11-14
        ("refused", 10),  # 11-12
        ("refused", 10),  # 11 alone: it holds up only itself and what follows
        ("refused", 10),
        (1, 11),
        (8, 19),
        (1, 20),
        (0, 20),
    ]
    sent = [r.attributes["llmtap.exchange_id"] for r in receiver.acknowledged_logs]
    assert sorted(sent) == [f"ex-{i:05d}" for i in range(20)]  # each acknowledged exactly once
    assert len(receiver.logs) > len(sent)  # the refused copies came too: they are the only duplicates


def test_the_option_needs_the_audit_log():
    with pytest.raises(SettingsError, match="otlp_logs"):
        Settings.from_values({"db": "", "otlp_logs": True})
    assert Settings.from_values({}).otlp_logs is False  # off by default


def test_llmtap_run_refuses_it_without_the_audit_log(tmp_path):
    args = [LLMTAP, "run", "--db", "", "--otlp-logs", "--metrics-port", "-1", "--listen-port", "0"]
    result = subprocess.run(
        [*args, "--confdir", str(tmp_path / "conf")], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 2
    assert "--otlp-logs" in result.stderr and "set --db" in result.stderr


def test_retention_never_deletes_an_unacknowledged_row(tmp_path):
    sink = new_sink(tmp_path)
    for i in range(10):
        sink.emit(make_record(i, request_start=1000.0 + i))  # all long expired
    sink.close()
    store = AuditStore(str(tmp_path / "llmtap.db"), fsync_batch=False, capture_content=False)
    try:
        assert store.prune(2000.0, 100, hold_for_export=True) == 0  # nothing acknowledged yet
        store.advance_log_export(4)
        store.advance_log_export(3)  # never backwards
        assert store.log_export_position() == (4, 6)
        assert store.prune(2000.0, 100, hold_for_export=True) == 4  # rows 1-4 only
        store.advance_log_export(10)
        assert store.prune(2000.0, 100) == 5  # the newest row stays: SQLite would reuse its id
        assert [row["id"] for row, _ in store.rows_after(0, 10, content=False)] == [10]
    finally:
        store.close()


# --- end to end: the real proxy, the openai SDK, the simulator ----------------------------------------


def chat(client: openai.OpenAI, stream: bool = False) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    answer = client.chat.completions.create(model="pulze", messages=messages, max_tokens=16, stream=stream)
    if stream:
        for _ in answer:
            pass


def test_e2e_one_record_per_exchange_no_key_no_content(tmp_path, simulator, receiver):
    tap = start_tap(tmp_path, simulator.url, "--otlp-logs", env={"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": receiver.logs_url})
    try:
        with tap.client() as client:
            for i in range(6):
                chat(client, stream=bool(i % 2))
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(
                    model="pulze", messages=[{"role": "user", "content": PROMPT}], extra_headers={"X-Sim-Fault": "500"}
                )
        received = receiver.wait_logs(7)
        records = tap.wait_records(7)
    finally:
        tap.stop()
    rows = db_rows(tap.db)
    assert len(received) == len(rows) == 7
    got = by_exchange(received)
    for row in rows:
        check_record(got[row["exchange_id"]], row)
    for record in records:  # the proxy's own record of each exchange: the same ids and numbers
        attributes = got[record.exchange_id].attributes
        assert attributes["llmtap.key_fingerprint"] == record.key_fingerprint
        assert attributes.get("llmtap.cost_usd") == record.cost_usd
        assert attributes.get("llmtap.input_tokens") == record.input_tokens
        assert attributes["llmtap.stream"] == int(record.stream)
    assert sum(r.attributes.get("llmtap.error_type") == "http_500" for r in received) == 1
    wire = receiver.raw_bytes()
    assert API_KEY.encode() not in wire and b"sk-test" not in wire
    assert PROMPT.encode() not in wire


def test_e2e_grpc_with_content(tmp_path, simulator):
    with OTLPGRPCReceiver() as grpc_receiver:
        tap = start_tap(
            tmp_path,
            simulator.url,
            "--otlp-logs",
            "--capture-content",
            env={"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": grpc_receiver.url},
        )
        try:
            with tap.client() as client:
                chat(client)
                chat(client, stream=True)
            received = by_exchange(grpc_receiver.wait_logs(2))
        finally:
            tap.stop()
    contents = {c["exchange_id"]: c for c in db_rows(tap.db, "content")}
    for row in db_rows(tap.db):
        record = received[row["exchange_id"]]
        check_record(record, row, contents[row["exchange_id"]])
        assert PROMPT in record.attributes["llmtap.input_messages"]
        assert json.loads(record.attributes["llmtap.output_messages"])[0]["content"]
    assert API_KEY.encode() not in grpc_receiver.raw_bytes()


def test_e2e_collector_down_then_up_every_record_at_least_once(tmp_path, simulator):
    """Nothing listens, then a collector that takes the first requests but whose answers are lost
    (503), then a healthy one: every row arrives, the acknowledged copies are unique, and the
    cursor never stood past a record that was not acknowledged."""
    port = free_port()
    tap = start_tap(
        tmp_path,
        simulator.url,
        "--otlp-logs",
        env={
            "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": f"http://127.0.0.1:{port}/v1/logs",
            "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT": "1",
        },
    )
    db = tap.db
    acknowledged: set[str] = set()
    violations: list[str] = []
    answers = iter([False, False, False])  # the first three requests: taken, then answered 503

    def decide(records: list[ReceivedLog]) -> bool:
        """Runs while llmtap waits for the answer: the cursor must be short of every record sent."""
        ids = {row["exchange_id"]: row["id"] for row in db_rows(db)}
        at = cursor(db)
        for record in records:
            exchange_id = record.attributes["llmtap.exchange_id"]
            if ids[exchange_id] <= at:
                violations.append(f"{exchange_id} (row {ids[exchange_id]}) resent with the cursor at {at}")
        passed = [exchange_id for exchange_id, row_id in ids.items() if row_id <= at]
        violations.extend(f"cursor {at} passed unacknowledged {e}" for e in passed if e not in acknowledged)
        ack = next(answers, True)
        if ack:
            acknowledged.update(r.attributes["llmtap.exchange_id"] for r in records)
        return ack

    receiver = OTLPHTTPReceiver(port)
    receiver.on_logs = decide
    try:
        with tap.client() as client:
            for i in range(10):
                chat(client, stream=bool(i % 2))  # traffic flows while the collector is away
        wait_until(lambda: row_count(db) == 10)
        wait_until(lambda: tap.metric("llmtap_internal_errors_total", stage="log_export") >= 2)
        assert cursor(db) == 0
        wait_until(lambda: tap.metric("llmtap_log_export_backlog") == 10)
        receiver.start()  # the collector is back, on the same address
        with tap.client() as client:
            for i in range(10):
                chat(client, stream=bool(i % 2))
        wait_until(lambda: row_count(db) == 20)
        wait_until(lambda: len({r.attributes["llmtap.exchange_id"] for r in receiver.acknowledged_logs}) == 20, 30)
        wait_until(lambda: tap.metric("llmtap_log_export_backlog") == 0)
    finally:
        tap.stop()
        receiver.stop()
    rows = db_rows(db)
    assert len(rows) == 20 and len(simulator.exchanges) == 20  # traffic unaffected, nothing lost
    assert violations == []
    acked = [r.attributes["llmtap.exchange_id"] for r in receiver.acknowledged_logs]
    assert sorted(acked) == sorted(row["exchange_id"] for row in rows)  # each acknowledged exactly once
    refused = [
        r.attributes["llmtap.exchange_id"] for q in receiver.log_requests if not q.acknowledged for r in q.records
    ]
    assert refused  # the lost answers did happen
    copies = [r.attributes["llmtap.exchange_id"] for r in receiver.logs]
    duplicated = {e for e in copies if copies.count(e) > 1}
    assert duplicated and duplicated <= set(refused)  # duplicates only of what was not acknowledged
    assert cursor(db) == rows[-1]["id"]


def test_e2e_writer_killed_between_commit_and_acknowledgement(tmp_path, simulator, receiver):
    """The writer is kill -9-ed while the collector holds its first export: the restarted writer
    sends those records again, and they are acknowledged."""
    held, release = threading.Event(), threading.Event()

    def decide(records: list[ReceivedLog]) -> bool:
        if not held.is_set():
            held.set()
            release.wait(30)
            return False  # nobody is left to read this answer
        return True

    receiver.on_logs = decide
    tap = start_tap(
        tmp_path,
        simulator.url,
        "--otlp-logs",
        env={"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": receiver.logs_url, "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT": "30"},
    )
    try:
        with tap.client() as client:
            chat(client)
            assert held.wait(15)  # the row is committed and its export is in flight
            (pid,) = writer_pids(tap.db)
            os.kill(pid, signal.SIGKILL)
            release.set()
            for _ in range(3):
                chat(client)  # the journal takes them while the sink restarts the writer
        wait_until(lambda: len(receiver.acknowledged_logs) >= 4, 30)
        assert writer_pids(tap.db) and writer_pids(tap.db) != [pid]
    finally:
        tap.stop()
    [first] = receiver.log_requests[0].records
    rows = db_rows(tap.db)
    acked = [r.attributes["llmtap.exchange_id"] for r in receiver.acknowledged_logs]
    assert first.attributes["llmtap.exchange_id"] == rows[0]["exchange_id"]
    assert sorted(acked) == sorted(row["exchange_id"] for row in rows)  # resent after the restart, once
    assert cursor(tap.db) == rows[-1]["id"]


# --- the route to ClickHouse: the Collector pipeline, and the SQL run in ClickHouse's engine ----------

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_collector_pipeline_is_otlp_batch_clickhouse_into_the_table_the_sql_reads():
    config = yaml.safe_load((DEPLOY / "otel-collector-clickhouse.yml").read_text())
    pipeline = config["service"]["pipelines"]["logs"]
    assert pipeline == {"receivers": ["otlp"], "processors": ["batch"], "exporters": ["clickhouse"]}
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    exporter = config["exporters"]["clickhouse"]
    table = f"{exporter['database']}.{exporter['logs_table_name']}"
    assert f"FROM {table}\n" in (DEPLOY / "clickhouse.sql").read_text()
    assert exporter["create_schema"] is True and exporter["retry_on_failure"]["max_elapsed_time"] == 0
    queue = exporter["sending_queue"]
    assert queue["enabled"] and queue["storage"] in config["extensions"]
    assert config["service"]["extensions"] == [queue["storage"]]


#: The columns of the ClickHouse exporter's default log table that the view reads, with their
#: types (the exporter creates the real table, with more columns and indexes, itself).
EXPORTER_TABLE = """
CREATE TABLE llmtap.otel_logs (
    Timestamp DateTime64(9), TraceId String, SpanId String, TraceFlags UInt8,
    SeverityText LowCardinality(String), SeverityNumber UInt8, ServiceName LowCardinality(String),
    Body String, ResourceAttributes Map(LowCardinality(String), String), ScopeName String,
    ScopeVersion LowCardinality(String), LogAttributes Map(LowCardinality(String), String)
) ENGINE = MergeTree PARTITION BY toDate(Timestamp) ORDER BY (ServiceName, Timestamp)
"""


def exporter_text(value) -> str:
    """An attribute value as the exporter stores it (pdata's ``Value.AsString``: JSON-style
    numbers, ``true``/``false``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value == 0 or 1e-6 <= abs(value) < 1e21:
            text = format(Decimal(repr(value)), "f")
            return text.rstrip("0").rstrip(".") if "." in text else text
        return repr(value).replace("e-0", "e-").replace("e+", "e+")
    return str(value)


def exporter_row(record: ReceivedLog) -> dict:
    """The row the exporter inserts for a received record (its mapping, column by column)."""
    seconds, nanos = divmod(record.time_ns, 10**9)
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return {
        "Timestamp": f"{stamp}.{nanos:09d}",
        "TraceId": record.trace_id,
        "SpanId": record.span_id,
        "TraceFlags": record.flags,
        "SeverityText": record.severity_text,
        "SeverityNumber": record.severity_number,
        "ServiceName": record.resource.get("service.name", ""),
        "Body": record.body or "",
        "ResourceAttributes": {k: exporter_text(v) for k, v in record.resource.items()},
        "ScopeName": record.scope,
        "ScopeVersion": record.scope_version,
        "LogAttributes": {k: exporter_text(v) for k, v in record.attributes.items()},
    }


def exact_cost(row: dict) -> Decimal | None:
    """The row's cost as exact decimal dollars: its nano-dollars when it has them."""
    if row["cost_nanousd"] is not None:
        return Decimal(row["cost_nanousd"]) / 10**9
    return None if row["cost_usd"] is None else Decimal(repr(row["cost_usd"]))


def sql_statements(path: Path) -> list[str]:
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("--"))
    return [statement.strip() for statement in text.split(";") if statement.strip()]


def test_clickhouse_sql_types_the_records_and_collapses_duplicates(tmp_path, receiver, monkeypatch):
    """deploy/clickhouse.sql in chDB (ClickHouse 26 in-process), fed the records llmtap really sent,
    duplicates included: each exchange once, every typed value equal to the audit row."""
    from chdb import session as chdb_session

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", receiver.logs_url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT", "0.5")
    answers = iter([False, False])  # the first two requests arrive but their answers are lost
    receiver.on_logs = lambda records: next(answers, True)
    sink = new_sink(tmp_path, otlp_logs=True)
    records = [make_record(i, labels={"team": f"t{i % 3}"}, family="openai_chat" if i % 2 else None) for i in range(12)]
    records[5] = records[5].replace(cost_usd=None, cost_source="unknown", input_tokens=None, stream=True)
    records[7] = records[7].replace(cost_usd=1.5e-7, error_type="http_500")
    for i in (2, 3, 4):  # priced from a database: exact nano-dollars and the price's provenance
        nano = 123_456_789 + i
        records[i] = records[i].replace(
            cost_nanousd=nano,
            cost_usd=nano / 1e9,
            cost_source="database",
            price_version="genai-prices:0.0.61",
            price_model="openai/gpt-4o-mini",
        )
    for record in records:
        sink.emit(record)
        if record is records[1]:
            sink.flush()  # two batches: the refused ones and the rest
    sink.close()
    received = receiver.logs
    rows = {row["exchange_id"]: row for row in db_rows(tmp_path / "llmtap.db")}
    assert len(received) > len(rows) == 12  # duplicates did arrive

    session = chdb_session.Session(str(tmp_path / "clickhouse"))
    try:
        session.query("CREATE DATABASE llmtap")
        session.query(EXPORTER_TABLE)
        for statement in sql_statements(DEPLOY / "clickhouse.sql"):
            session.query(statement)
        for request in receiver.log_requests:  # one INSERT per request, as the Collector's batches
            lines = "\n".join(json.dumps(exporter_row(record)) for record in request.records)
            session.query(f"INSERT INTO llmtap.otel_logs FORMAT JSONEachRow\n{lines}")
        session.query("INSERT INTO llmtap.otel_logs (ScopeName, LogAttributes) VALUES ('other', map('k', 'v'))")

        def select(sql: str) -> list[dict]:
            text = str(session.query(sql, "JSONEachRow"))
            return [json.loads(line) for line in text.splitlines() if line]

        [raw] = select("SELECT count() AS n FROM llmtap.exchanges")
        assert raw["n"] == len(received)  # every copy went through the view
        typed = select(
            "SELECT *, toString(cost_usd) AS cost, toUnixTimestamp64Micro(request_start) AS start_us "
            "FROM llmtap.exchanges FINAL ORDER BY exchange_id"
        )
        session.query("OPTIMIZE TABLE llmtap.exchanges FINAL")
        [merged] = select("SELECT count() AS n FROM llmtap.exchanges")
        [spend] = select(
            "SELECT toString(sum(cost_usd)) AS usd, countIf(cost_usd IS NULL) AS unpriced FROM llmtap.exchanges FINAL"
        )
    finally:
        session.close()
    assert merged["n"] == len(typed) == 12  # each exchange once
    assert [t["exchange_id"] for t in typed] == sorted(rows)
    for t in typed:
        row = rows[t["exchange_id"]]
        assert (None if t["cost"] is None else Decimal(t["cost"])) == exact_cost(row)
        assert (t["cost_nanousd"], t["price_version"], t["price_model"]) == (
            row["cost_nanousd"],
            row["price_version"],
            row["price_model"],
        )
        assert t["start_us"] == round(row["request_start"] * 1e9) // 1000  # the record's ns, to the µs
        assert (t["input_tokens"], t["output_tokens"]) == (row["input_tokens"], row["output_tokens"])
        assert (t["family"], t["operation"]) == (row["family"], row["operation"])
        assert (t["provider"], t["key_fingerprint"], t["cost_source"]) == (
            row["provider"],
            row["key_fingerprint"],
            row["cost_source"],
        )
        assert (t["error_type"], t["http_status"], t["stream"]) == (
            row["error_type"],
            row["http_status"],
            bool(row["stream"]),
        )
        assert t["labels"] == json.loads(row["labels"]) and (t["trace_id"], t["row_hash"]) == (
            row["trace_id"],
            as_hex(row["row_hash"]),
        )
    exact = sum(exact_cost(row) for row in rows.values() if row["cost_usd"] is not None)
    assert Decimal(spend["usd"]) == exact and spend["unpriced"] == 1  # exact money, unknown kept apart
