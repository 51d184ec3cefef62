"""Audit rows as OTLP log records (``--otlp-logs``), delivered at least once.

Every record is decoded by a real OTLP receiver on loopback (``tests/otlp_receiver.py``, HTTP
and gRPC), and compared with the row the real audit writer process committed to SQLite. The
delivery tests take the collector away (nothing listening, then refusals, then a writer killed
while it waits for the answer) and check what arrived, what was acknowledged, and where the
store's cursor stood at every request.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from otlp_receiver import OTLPGRPCReceiver, OTLPHTTPReceiver, ReceivedLog
from test_audit import (
    SECRET_ANSWER,
    SECRET_PROMPT,
    db_rows,
    make_record,
    new_sink,
    with_content,
)

from llmtap.audit.logexport import EVENT_NAME, NOT_EXPORTED, LogExport, NotAcknowledged
from llmtap.audit.store import AuditStore
from llmtap.config import Settings
from llmtap.health import Health

PROMPT = "walrus-okapi-5521 describe the tangerine observatory"


def expected_attributes(row: dict, content: dict | None = None) -> dict:
    """What a record must carry: every non-NULL exported column, named llmtap.<column>, as stored."""
    attributes = {
        f"llmtap.{name}": value for name, value in row.items() if value is not None and name not in NOT_EXPORTED
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
    export = LogExport(settings, Health(), open_store)  # its thread waits for a notify that never comes
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
        export.close(timeout=0.1)
        for store in stores:
            store.close()
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
