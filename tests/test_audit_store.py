"""The SQLite audit store: schema and migrations, typed rows, the hash chain, retention, content.

Records are built by hand and written through a real ``AuditSink`` into real SQLite files.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sqlite3
import time

import pytest
from audit_helpers import (
    NOW,
    all_bytes,
    db_rows,
    journal_files,
    make_record,
    new_sink,
    row_count,
    run_verify,
    write_records,
)
from click.testing import CliRunner
from conftest import wait_until

from llmtap.audit.report import report as report_command
from llmtap.audit.rows import as_hex, body_json, chain_hash, metadata_of, row_builder
from llmtap.audit.sqlite import MIGRATIONS, PAGE_SIZE, AuditStore, connect, verify_chain
from llmtap.health import Health
from llmtap.protocols.content import cap_messages
from llmtap.record import FIELD_NAMES, ExchangeRecord

# --- schema ---------------------------------------------------------------------------------

#: The schema is a contract (reports, Datasette queries, the hash chain): change it only by
#: appending a migration, then update this snapshot.
EXPECTED_TABLES = {"exchanges", "content", "journal_offsets", "pruned"}
DERIVED_COLUMNS = {"id", "duration_s", "ttft_s", "metadata_json", "prev_hash", "row_hash"}


def test_migrates_an_empty_file_to_the_current_schema(tmp_path):
    db = connect(tmp_path / "new.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert set(db.table_names()) >= EXPECTED_TABLES
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE
    columns = {c.name: c.type for c in db["exchanges"].columns}
    record_columns = set(FIELD_NAMES) - {"input_messages", "output_messages", "metadata"}
    assert set(columns) == record_columns | DERIVED_COLUMNS, "a record field needs a migration adding its column"
    assert columns["cost_usd"] == "REAL" and columns["input_tokens"] == "INTEGER" and columns["labels"] == "TEXT"
    indexed = {tuple(ix.columns) for ix in db["exchanges"].indexes}
    # only the indexes a query uses (issue 17): grouping reads the rollups or scans the range
    assert indexed == {("exchange_id",), ("request_start",)}
    assert any(ix.unique and ix.columns == ["exchange_id"] for ix in db["exchanges"].indexes)
    assert "input_messages" not in columns and "output_messages" not in columns
    db.conn.close()
    again = connect(tmp_path / "new.db")  # re-opening applies nothing twice
    assert again.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    again.conn.close()


def test_row_keeps_every_field_typed_and_unknown_distinct_from_zero(tmp_path):
    sink = new_sink(tmp_path)
    sink.emit(make_record(1))
    sink.emit(make_record(2, cost_usd=None, cost_source="unknown", cost_savings_usd=None, metadata=None))
    sink.emit(make_record(3, cost_usd=0.0, cost_source="computed", temperature=-0.0, score=float("nan")))
    sink.close()
    rows = {r["exchange_id"]: r for r in db_rows(tmp_path / "llmtap.db")}
    row, record = rows["ex-00001"], make_record(1)
    for name in FIELD_NAMES:
        if name in ("input_messages", "output_messages", "metadata"):
            continue
        value = getattr(record, name)
        if name in ("labels", "weights", "policies", "stop", "tool_names", "finish_reasons", "response_labels"):
            assert json.loads(row[name]) == record.to_dict()[name], name
        else:
            assert row[name] == value, name  # bools as 0/1, ints in REAL columns as floats
    assert metadata_of(row) == record.metadata  # unknown Pulze fields kept whole
    assert row["temperature"] == 1.0 and isinstance(row["temperature"], float)
    assert row["duration_s"] == pytest.approx(record.duration_s)
    assert row["ttft_s"] == pytest.approx(record.time_to_first_token_s)
    assert rows["ex-00002"]["cost_usd"] is None and rows["ex-00002"]["cost_source"] == "unknown"
    assert rows["ex-00003"]["cost_usd"] == 0.0 and rows["ex-00003"]["cost_source"] == "computed"
    assert rows["ex-00003"]["score"] is None  # NaN cannot be stored faithfully: NULL, never 0
    assert run_verify(tmp_path / "llmtap.db").exit_code == 0


def test_files_are_private(tmp_path):
    old = os.umask(0o022)
    try:
        sink = new_sink(tmp_path)
        sink.emit(make_record(1))
        sink.flush()
        names = {"llmtap.db", "llmtap.db-wal", "llmtap.db-shm", "llmtap.db.journal.lock", *journal_files(tmp_path)}
        assert any(".journal." in n and not n.endswith("lock") for n in names)
        for name in names:
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
        sink.close()
    finally:
        os.umask(old)


def test_hash_is_the_documented_canonical_form(tmp_path):
    write_records(tmp_path, 3)
    rows = db_rows(tmp_path / "llmtap.db")
    prev = bytes(32)  # GENESIS as a digest
    for row in rows:
        body = {k: v for k, v in row.items() if v is not None and k not in ("id", "prev_hash", "row_hash")}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        expected = hashlib.sha256(prev + canonical.encode()).digest()  # 32 raw bytes, stored as a BLOB
        assert row["prev_hash"] == prev and row["row_hash"] == expected == chain_hash(prev, row)
        prev = row["row_hash"]


def test_odd_values_and_garbage_lines_never_block_the_writer(tmp_path):
    odd = make_record(1).to_dict() | {
        "max_tokens": 2**70,
        "temperature": "hot",
        "seed": 3.0,
        "score": True,
        "labels": {"team": "\ud800"},
        "metadata": {"latency": float("nan")},
        "a_field_from_a_newer_llmtap": 1,
    }
    lines = [json.dumps(odd), "[]", "not json", '{"no": "exchange_id"}', make_record(2).to_json()]
    (tmp_path / "llmtap.db.journal.1").write_text("\n".join(lines) + "\n")
    health = Health()
    sink = new_sink(tmp_path, health)
    sink.emit(make_record(3, labels={"team": object()}))  # cannot be serialised: dropped, counted
    sink.emit(make_record(4))
    sink.close()
    rows = {r["exchange_id"]: r for r in db_rows(tmp_path / "llmtap.db")}
    assert sorted(rows) == ["ex-00001", "ex-00002", "ex-00004"]
    row = rows["ex-00001"]
    assert row["max_tokens"] is None and row["temperature"] is None and row["seed"] == 3 and row["score"] == 1.0
    assert json.loads(row["labels"]) == {"team": "?"}
    assert health.audit_dropped == 1
    assert health.internal_errors["audit"] >= 2  # the garbage lines, and the unserialisable record
    assert run_verify(tmp_path / "llmtap.db").exit_code == 0


def test_every_row_holds_row_builders_coercion_of_its_record(tmp_path):
    """The writer's shortcut for ordinary records changes no value and no hash."""
    plain = make_record(1).to_dict()
    variants = [
        {},
        {"temperature": -0.0, "cost_usd": 0, "seed": True},
        {"top_p": float("nan")},
        {"max_tokens": 2**63},
        {"warning": 'a "quote", a \\ and a\nnewline\x7f', "app_id": "日本", "labels": {"%s": "%d 100%"}},
        {"request_start": -1e308, "response_end": 1e308, "first_token_at": float("inf")},
        {"path": "\ud800", "weights": {"w": [1, 2.5, None, {"x": False}]}},
        {"category": 7, "retries": 2.0, "upstream_port": "443", "stop": "\n", "logit_bias": None},
        {"a_field_from_a_newer_llmtap": 1},
    ]
    records = [plain | changes | {"exchange_id": f"v-{i}"} for i, changes in enumerate(variants)]
    older = {k: v for k, v in plain.items() if k != "category"} | {"exchange_id": "v-older"}  # a field missing
    records.append(older)
    lines = [
        json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
        for r in records
    ]
    store = AuditStore(str(tmp_path / "llmtap.db"), fsync_batch=False, capture_content=False)
    batch = store.apply(1, lines, 1)
    assert (batch.corrupt, batch.rejected, len(batch.records)) == ([], [], len(lines))
    expected = row_builder(store.types)

    def typed(row: dict) -> dict:  # repr tells 0.0 from -0.0 and 1 from 1.0
        return {k: repr(v) for k, v in row.items() if k not in ("id", "prev_hash", "row_hash")}

    for record, row in zip(records, db_rows(tmp_path / "llmtap.db"), strict=True):
        assert typed(row) == typed(expected(json.loads(json.dumps(record)))), record["exchange_id"]
    store.close()
    assert run_verify(tmp_path / "llmtap.db").exit_code == 0


def test_a_batch_with_replayed_and_repeated_records_is_chained_row_by_row(tmp_path):
    db = tmp_path / "llmtap.db"
    line = {i: (make_record(i).to_json() + "\n").encode() for i in range(4)}
    store = AuditStore(str(db), fsync_batch=False, capture_content=False)
    store.apply(1, [line[0], line[1]], 2)
    batch = store.apply(1, [line[1], line[2], line[2], line[3]], 6)  # 1 was there, 2 twice
    assert (batch.corrupt, batch.rejected) == ([], [])
    assert gc.isenabled()
    assert [r["exchange_id"] for r in db_rows(db)] == [f"ex-{i:05d}" for i in range(4)]
    assert store.offsets == {1: 6}
    store.close()
    assert verify_chain(sqlite3.connect(db)).ok


def test_a_row_sqlite_refuses_is_dropped_and_the_rest_of_its_batch_chained(tmp_path):
    db = tmp_path / "llmtap.db"
    store = AuditStore(str(db), fsync_batch=False, capture_content=False)
    store.conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON exchanges WHEN NEW.exchange_id = 'ex-00002' "
        "BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    batch = store.apply(1, [(make_record(i).to_json() + "\n").encode() for i in range(5)], 1)
    assert batch.corrupt == [] and [str(e) for e in batch.rejected] == ["refused"]
    assert [r["exchange_id"] for r in db_rows(db)] == ["ex-00000", "ex-00001", "ex-00003", "ex-00004"]
    store.close()
    assert verify_chain(sqlite3.connect(db)).ok


# --- tamper evidence and retention -------------------------------------------------------------


def test_verify_passes_then_names_the_edited_row(tmp_path):
    db = tmp_path / "llmtap.db"
    write_records(tmp_path, 10)
    ok = run_verify(db)
    assert ok.exit_code == 0 and "OK: 10 rows" in ok.output
    conn = sqlite3.connect(db)
    conn.execute("UPDATE exchanges SET cost_usd = 0.000001 WHERE id = 6")
    conn.commit()
    broken = run_verify(db)
    assert broken.exit_code == 1
    assert "id=6" in broken.output and "ex-00005" in broken.output and "edited" in broken.output
    conn.execute("DELETE FROM exchanges WHERE id >= 6 AND id <= 6")
    conn.commit()
    conn.close()
    gap = run_verify(db)
    assert gap.exit_code == 1 and "id=7" in gap.output and "removed" in gap.output


def test_retention_prunes_in_batches_and_verify_still_passes(tmp_path):
    db = tmp_path / "llmtap.db"
    day = 86400
    sink = new_sink(tmp_path, retention_days=30, prune_batch=7)
    for i in range(30):  # 40 days old
        sink.emit(make_record(i, request_start=NOW - 40 * day + i, response_end=NOW - 40 * day + i + 1))
    for i in range(30, 50):
        sink.emit(make_record(i))
    sink.flush()
    wait_until(lambda: row_count(db) == 20)
    pruned = db_rows(db, "pruned")
    assert len(pruned) == 5 and sum(p["rows"] for p in pruned) == 30  # batches of 7, 7, 7, 7, 2
    assert run_verify(db).exit_code == 0
    for i in range(50, 55):
        sink.emit(make_record(i))
    sink.close()
    result = run_verify(db)
    assert result.exit_code == 0 and "OK: 25 rows" in result.output and "retention anchor" in result.output
    assert as_hex(db_rows(db)[0]["prev_hash"]) == pruned[-1]["anchor_hash"]


def test_rollups_outlive_the_rows_they_count_and_go_at_their_own_retention(tmp_path):
    db, day = tmp_path / "llmtap.db", 86400
    hour0 = NOW // 3600 * 3600
    sink = new_sink(tmp_path, retention_days=30, rollup_retention_days=60)
    ages = [90] * 3 + [40] * 4 + [0] * 2  # days: past both retentions, past the rows' only, recent
    for i, age in enumerate(ages):
        start = hour0 - age * day - 1800 + i
        sink.emit(make_record(i, request_start=start, response_end=start + 1))
    sink.close()  # the writer's last cycle applies, then prunes rows and rollups
    assert [r["exchange_id"] for r in db_rows(db)] == ["ex-00007", "ex-00008"]
    assert {p["rows"] for p in db_rows(db, "pruned")} == {7}

    def report(*extra: str) -> dict:
        since, until = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) for t in (hour0 - 100 * day, hour0 - day))
        args = ["--db", str(db), "--since", since, "--until", until, "--by", "model", "--format", "json", *extra]
        result = CliRunner().invoke(report_command, args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    rolled = report()
    assert rolled["totals"]["requests"] == 4 and "rollups" in rolled["source"]  # the 40-day-old hour only
    scanned = report("--exact")
    assert scanned["totals"]["requests"] == 0 and "deleted by retention" in scanned["source"]


# --- content capture ------------------------------------------------------------------------------

SECRET_PROMPT = "tell me the launch code PROMPT-7f3a"
SECRET_ANSWER = "the code is ANSWER-91bc"


def with_content(i: int, cap: int = 10_000) -> ExchangeRecord:
    """Content as the parser captures it: capped per direction, cut messages marked."""
    return make_record(
        i,
        input_messages=cap_messages(
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": SECRET_PROMPT}], cap
        ),
        output_messages=cap_messages([{"role": "assistant", "content": SECRET_ANSWER, "finish_reason": "stop"}], cap),
    )


def test_content_is_not_written_anywhere_when_capture_is_off(tmp_path):
    sink = new_sink(tmp_path)
    for i in range(5):
        sink.emit(with_content(i))
    sink.flush()
    data = all_bytes(tmp_path)  # DB, -wal and the journal, while running
    sink.close()
    data += all_bytes(tmp_path)
    assert b"PROMPT-7f3a" not in data and b"ANSWER-91bc" not in data
    assert db_rows(tmp_path / "llmtap.db", "content") == []


def test_content_is_kept_apart_and_capped_when_capture_is_on(tmp_path):
    sink = new_sink(tmp_path, capture_content=True, content_max_chars=20)
    sink.emit(with_content(1, cap=20))
    sink.emit(make_record(2))  # nothing to capture: no content row
    sink.close()
    (content,) = db_rows(tmp_path / "llmtap.db", "content")
    assert content["exchange_id"] == "ex-00001"
    messages = json.loads(content["input_messages"])
    assert messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": SECRET_PROMPT[:12], "truncated": True},
    ]
    assert json.loads(content["output_messages"])[0]["content"] == SECRET_ANSWER[:20]
    assert content["truncated"] == 1
    main = db_rows(tmp_path / "llmtap.db")[0]
    assert SECRET_PROMPT[:8] not in body_json(main)
