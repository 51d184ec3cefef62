"""The SQLite audit log: journal, exactly-once replay, hash chain, retention, content, faults.

Unit tests build records by hand and use real SQLite files; the end-to-end tests at the bottom
drive the real proxy (``llmtap run``) with the openai SDK, kill it, and compare the rows with
what the simulator really answered.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner
from conftest import API_KEY, start_tap, wait_until

from llmtap.audit.report import audit
from llmtap.audit.store import (
    GENESIS,
    MIGRATIONS,
    PAGE_SIZE,
    AuditStore,
    chain_hash,
    connect,
    row_builder,
    verify_chain,
)
from llmtap.config import Settings
from llmtap.health import Health
from llmtap.protocols.content import cap_messages
from llmtap.record import FIELD_NAMES, ExchangeRecord, canonical_json
from llmtap.sinks.audit import AuditLogInUse, AuditSink

NOW = time.time()


def make_record(i: int, **changes) -> ExchangeRecord:
    """A realistic finished exchange; every kind of field filled."""
    record = ExchangeRecord(
        exchange_id=f"ex-{i:05d}",
        operation="chat",
        method="POST",
        path="/v1/chat/completions",
        request_start=NOW - 10 + i * 0.001,
        request_end=NOW - 9.99 + i * 0.001,
        response_start=NOW - 9.5 + i * 0.001,
        first_token_at=NOW - 9.4 + i * 0.001,
        response_end=NOW - 9 + i * 0.001,
        upstream_latency_s=0.601,
        client_address="127.0.0.1",
        upstream_scheme="https",
        upstream_host="api.pulze.ai",
        upstream_port=443,
        router="pulze",
        provider="openai",
        http_status=200,
        stream=bool(i % 2),
        key_fingerprint="fp_0123456789abcdef",
        app_id="app-1",
        labels={"team": "search", "env": "prod"},
        weights={"cost": 0.5, "quality": 0.5},
        policies={"max_cost": 0.01},
        trace_id="a" * 32,
        span_id="b" * 16,
        request_model="pulze",
        max_tokens=64,
        temperature=1,
        top_p=0.9,
        n=1,
        stop=("\n\n",),
        tool_names=("search",),
        tool_count=1,
        logit_bias=True,
        response_id=f"chatcmpl-{i}",
        response_object="chat.completion",
        created_at=1701483003.546,
        response_model="openai/gpt-4o-mini",
        served_model="gpt-4o-mini",
        served_provider="openai",
        served_namespace="openai/gpt-4o-mini",
        input_tokens=10 + i,
        output_tokens=20 + i,
        total_tokens=30 + 2 * i,
        finish_reasons=("stop",),
        choice_count=1,
        cost_usd=0.00066 + i * 1e-6,
        cost_prompt_usd=0.0002,
        cost_completion_usd=0.00046 + i * 1e-6,
        cost_source="reported",
        cost_savings_usd=0.01,
        retries=0,
        upstream_status_code=200,
        score=0.87,
        response_labels={"team": "search"},
        category="general",
        metadata={"costs": {"total_tokens": 0.00066}, "new_pulze_field": [1, {"x": None}]},
    )
    return record.replace(**changes)


def new_sink(tmp_path: Path, health: Health | None = None, **kwargs) -> AuditSink:
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in Settings.__dataclass_fields__}
    options.setdefault("db", str(tmp_path / "llmtap.db"))
    return AuditSink(Settings(**options), health or Health(), **kwargs)


def write_records(tmp_path: Path, count: int) -> None:
    """An audit log holding records 0..count-1, written by a sink that then stopped cleanly."""
    sink = new_sink(tmp_path)
    for i in range(count):
        sink.emit(make_record(i))
    sink.close()


def db_rows(db: Path | str, table: str = "exchanges") -> list[dict]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)  # never create it by accident
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY rowid")]
    finally:
        conn.close()


def row_count(db: Path) -> int:
    """For polling: 0 until the proxy's writer has created the log."""
    try:
        return len(db_rows(db))
    except sqlite3.OperationalError:
        return 0


def journal_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if ".journal." in p.name and not p.name.endswith(".lock"))


def run_verify(db: Path | str):
    return CliRunner().invoke(audit, ["verify", "--db", str(db)])


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
    for column in ("exchange_id", "request_start", "response_model", "provider", "app_id", "key_fingerprint"):
        assert (column,) in indexed
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
    assert json.loads(row["metadata_json"]) == record.metadata  # unknown Pulze fields kept whole
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
    prev = GENESIS
    for row in rows:
        body = {k: v for k, v in row.items() if v is not None and k not in ("id", "prev_hash", "row_hash")}
        expected = (
            "sha256:"
            + hashlib.sha256(
                (prev + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)).encode()
            ).hexdigest()
        )
        assert row["prev_hash"] == prev and row["row_hash"] == expected == chain_hash(prev, row)
        prev = row["row_hash"]


# --- journal: exactly once ----------------------------------------------------------------------


def test_replay_after_a_crash_applies_each_record_exactly_once(tmp_path):
    db = tmp_path / "llmtap.db"
    write_records(tmp_path, 10)
    # A writer that died mid-way: journal generation 7 holds 30 lines, the first 12 of which it
    # had committed (rows and offset in one transaction), then a torn half line from kill -9.
    lines = [(make_record(i).to_json() + "\n").encode() for i in range(10, 40)]
    journal = tmp_path / "llmtap.db.journal.7"
    journal.write_bytes(b"".join(lines) + lines[0][:40])
    store = AuditStore(str(db), fsync_batch=False, capture_content=False)
    store.apply(7, lines[:12], sum(map(len, lines[:12])))
    store.close()
    health = Health()
    sink = new_sink(tmp_path, health)
    sink.flush()
    ids = [r["exchange_id"] for r in db_rows(db)]
    assert ids == [f"ex-{i:05d}" for i in range(40)]
    assert health.internal_errors["audit"] == 1  # the torn tail, counted and logged
    assert health.audit_dropped == 0
    assert journal_files(tmp_path) == ["llmtap.db.journal.8"]  # 7 retired once applied
    sink.close()
    assert journal_files(tmp_path) == []
    assert verify_chain(sqlite3.connect(db)).ok


def test_replay_is_deduplicated_when_the_offset_was_lost(tmp_path):
    """A crash between forgetting a generation's offset and unlinking its file replays it from 0."""
    db = tmp_path / "llmtap.db"
    lines = [(make_record(i).to_json() + "\n").encode() for i in range(20)]
    (tmp_path / "llmtap.db.journal.3").write_bytes(b"".join(lines))
    store = AuditStore(str(db), fsync_batch=False, capture_content=False)
    store.apply(3, lines, sum(map(len, lines)))
    store.forget(3)
    store.close()
    sink = new_sink(tmp_path)
    sink.close()
    assert len(db_rows(db)) == 20
    assert journal_files(tmp_path) == []
    assert verify_chain(sqlite3.connect(db)).ok


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


CHILD = """
import os, signal, time
from llmtap.config import Settings
from llmtap.health import Health
from llmtap.record import ExchangeRecord
from llmtap.sinks.audit import AuditSink
sink = AuditSink(Settings(db={db!r}), Health())
"""
CRASHING_CHILD = (
    CHILD
    + """
for i in range({n}):
    sink.emit(ExchangeRecord(exchange_id=f"ex-{{i:05d}}", operation="chat", method="POST",
                             path="/v1/chat/completions", request_start=time.time(), metadata={{"pad": "x" * 1500}}))
    if i % 50 == 0:
        time.sleep(0.002)  # let the writer process commit some batches, not all
os.kill(os.getpid(), signal.SIGKILL)
"""
)


def test_kill_9_of_the_writing_process_loses_nothing(tmp_path):
    code = CRASHING_CHILD.format(db=str(tmp_path / "llmtap.db"), n=400)
    proc = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    sink = new_sink(tmp_path)
    sink.close()
    ids = [r["exchange_id"] for r in db_rows(tmp_path / "llmtap.db")]
    assert ids == [f"ex-{i:05d}" for i in range(400)]
    assert journal_files(tmp_path) == []
    assert verify_chain(sqlite3.connect(tmp_path / "llmtap.db")).ok


def writer_pids(db: Path) -> list[int]:
    """The audit writer processes working on ``db`` (found by their command line)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"llmtap.audit.writer" in cmdline and str(db).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def test_the_writer_of_a_killed_proxy_applies_what_was_journaled_and_exits(tmp_path):
    db = tmp_path / "llmtap.db"
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_CHILD.format(db=str(db), n=300)], timeout=60, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    wait_until(lambda: row_count(db) == 300, timeout=30)  # nobody restarted the proxy
    wait_until(lambda: not writer_pids(db), timeout=15)
    assert len(journal_files(tmp_path)) == 1  # the newest generation waits for the next start to retire it
    new_sink(tmp_path).close()
    assert journal_files(tmp_path) == [] and row_count(db) == 300


def test_a_killed_writer_is_restarted_and_nothing_is_lost(tmp_path):
    db = tmp_path / "llmtap.db"
    health = Health()
    sink = new_sink(tmp_path, health)
    try:
        for i in range(50):
            sink.emit(make_record(i))
        sink.flush()
        (pid,) = wait_until(lambda: writer_pids(db))
        assert pid != os.getpid()  # SQLite is written by another process
        os.kill(pid, signal.SIGKILL)
        for i in range(50, 100):
            sink.emit(make_record(i))  # the journal takes them while no writer runs
        wait_until(lambda: health.internal_errors["audit"] >= 1)
        sink.flush(timeout=15)
        assert health.gauges["audit_queue_depth"]() == 0
        (new_pid,) = writer_pids(db)
        assert new_pid != pid
    finally:
        sink.close()
    assert [r["exchange_id"] for r in db_rows(db)] == [f"ex-{i:05d}" for i in range(100)]
    assert verify_chain(sqlite3.connect(db)).ok and health.audit_dropped == 0
    assert not writer_pids(db)  # close() stops it


@pytest.mark.parametrize("fsync", ["never", "batch"])
def test_rotation_retires_applied_generations(tmp_path, fsync):
    sink = new_sink(tmp_path, fsync=fsync, rotate_bytes=5000)  # each record is ~2 KB of JSON
    seen = set()
    for i in range(30):
        sink.emit(make_record(i))
        sink.flush()
        files = journal_files(tmp_path)
        assert len(files) <= 2  # the current generation, and at most one being retired
        seen.update(files)
    assert len(seen) >= 8
    sink.close()
    assert journal_files(tmp_path) == []
    assert [r["exchange_id"] for r in db_rows(tmp_path / "llmtap.db")] == [f"ex-{i:05d}" for i in range(30)]


def test_second_process_on_the_same_log_is_refused(tmp_path):
    sink = new_sink(tmp_path)
    code = CHILD.format(db=str(tmp_path / "llmtap.db"))
    proc = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True)
    assert proc.returncode != 0 and b"AuditLogInUse" in proc.stderr
    sink.close()
    new_sink(tmp_path).close()  # released on close
    with pytest.raises(AuditLogInUse):  # and held within a process too
        first = new_sink(tmp_path)
        try:
            new_sink(tmp_path)
        finally:
            first.close()


# --- faults: the proxy keeps serving, nothing silently lost --------------------------------------


def test_locked_database_delays_rows_then_they_arrive(tmp_path):
    health = Health()
    sink = new_sink(tmp_path, health, max_backoff=0.2)
    sink.emit(make_record(0))
    sink.flush()
    blocker = sqlite3.connect(tmp_path / "llmtap.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(1, 21):
            sink.emit(make_record(i))  # returns at once: the journal takes it
        wait_until(lambda: health.internal_errors["audit"] >= 1, timeout=15)
        assert health.gauges["audit_queue_depth"]() == 20
        assert blocker.execute("SELECT count(*) FROM exchanges").fetchone()[0] == 1
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    sink.flush(timeout=15)
    assert health.gauges["audit_queue_depth"]() == 0
    assert len(db_rows(tmp_path / "llmtap.db")) == 21
    assert health.audit_dropped == 0
    sink.close()
    assert verify_chain(sqlite3.connect(tmp_path / "llmtap.db")).ok


def test_unwritable_location_holds_records_in_memory_then_recovers(tmp_path, caplog):
    """Neither the journal nor the DB can be created; a bounded queue keeps what fits, counts the rest."""
    where = tmp_path / "later"
    health = Health()
    sink = new_sink(tmp_path, health, db=str(where / "llmtap.db"), memory_limit=5, max_backoff=0.2)
    for i in range(8):
        sink.emit(make_record(i))
    assert health.audit_dropped == 3
    assert health.gauges["audit_queue_depth"]() == 5
    assert "dropped" in caplog.text
    where.mkdir()
    sink.flush(timeout=15)
    assert [r["exchange_id"] for r in db_rows(where / "llmtap.db")] == [f"ex-{i:05d}" for i in range(5)]
    assert health.gauges["audit_queue_depth"]() == 0
    sink.close()


def make_read_only(path: Path):
    """Make a file unwritable even for root (chattr +i); return the undo."""
    if os.geteuid() != 0:
        path.chmod(0o400)
        return lambda: path.chmod(0o600)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)
    pytest.skip("no way to make a file read-only for root here")


def test_read_only_database_then_recovery(tmp_path):
    db = tmp_path / "llmtap.db"
    connect(db).conn.close()
    undo = make_read_only(db)
    health = Health()
    try:
        sink = new_sink(tmp_path, health, max_backoff=0.2)
        for i in range(5):
            sink.emit(make_record(i))
        wait_until(lambda: health.internal_errors["audit"] >= 2, timeout=15)  # retried, still failing
        assert health.gauges["audit_queue_depth"]() == 5
        assert row_count(db) == 0
    finally:
        undo()
    sink.flush(timeout=15)
    assert row_count(db) == 5 and health.audit_dropped == 0
    sink.close()


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
    assert db_rows(db)[0]["prev_hash"] == pruned[-1]["anchor_hash"]


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


def all_bytes(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())


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
    assert SECRET_PROMPT[:8] not in canonical_json(main)


# --- end to end: the real proxy, the openai SDK, the simulator's ground truth ---------------------

#: (operation, streamed, fault): every kind of outcome, twice. "cancel" = the client walks away.
PLAN = [
    ("chat", False, None),
    ("chat", True, None),
    ("text", False, None),
    ("text", True, None),
    ("chat", False, "429"),
    ("chat", False, "500"),
    ("chat", False, "422"),
    ("chat", False, "truncate"),
    ("chat", True, "truncate"),
    ("chat", False, "disconnect"),
    ("chat", True, "cancel"),
] * 2


def send(client: openai.OpenAI, i: int, operation: str, stream: bool, fault: str | None) -> None:
    headers = {"Pulze-Labels": json.dumps({"team": f"t{i % 2}"})}
    if fault and fault != "cancel":
        headers["X-Sim-Fault"] = fault
    try:
        if operation == "chat":
            result = client.chat.completions.create(
                model="pulze",
                messages=[{"role": "user", "content": f"question {i}"}],
                stream=stream,
                extra_headers=headers,
            )
        else:
            result = client.completions.create(
                model="pulze", prompt=f"question {i}", stream=stream, extra_headers=headers
            )
        if stream:
            for n, _ in enumerate(result):
                if fault == "cancel" and n == 1:
                    result.close()
                    break
    except (openai.APIError, httpx.HTTPError):
        pass  # faults are the point; the audit log must still hold a row for each


def sim_final(exchange) -> dict | None:
    """What the simulator reported for a completed exchange: the body, or the stream's last usage event."""
    if not exchange.completed:
        return None
    if exchange.response_json and "usage" in exchange.response_json:
        return exchange.response_json
    if exchange.stream_events:
        return next((e for e in reversed(exchange.stream_events) if e.get("usage")), None)
    return None


def test_rows_match_the_traffic_exactly_and_survive_a_graceful_stop(tmp_path, simulator):
    tap = start_tap(tmp_path, simulator.url)
    client = openai.OpenAI(base_url=tap.base_url, api_key=API_KEY, max_retries=0, timeout=30)
    try:
        for i, step in enumerate(PLAN):
            send(client, i, *step)
        tap.wait_records(len(PLAN))  # the proxy finished every exchange (cancelled ones end late)
        files_while_running = all_bytes(tmp_path)  # DB, -wal and journal mid-flight
    finally:
        client.close()
        assert tap.stop() == 0  # SIGINT, right away: close() must apply what is still journaled
    assert len(simulator.exchanges) == len(PLAN)
    rows = db_rows(tap.db)
    assert len(rows) == len(PLAN) == len({r["exchange_id"] for r in rows})
    by_response = {r["response_id"]: r for r in rows if r["response_id"]}
    completed = [(ex, sim_final(ex)) for ex in simulator.exchanges if sim_final(ex)]
    assert len(completed) == 8  # 4 kinds of success, twice
    for ex, final in completed:
        row = by_response[final["id"]]
        assert row["stream"] == bool(ex.stream_events)
        assert row["input_tokens"] == final["usage"]["prompt_tokens"]
        assert row["output_tokens"] == final["usage"]["completion_tokens"]
        assert row["cost_usd"] == pytest.approx(final["metadata"]["costs"]["total_tokens"], rel=1e-12)
        assert row["cost_savings_usd"] == pytest.approx(final["metadata"]["cost_savings"]["total_tokens"], rel=1e-12)
        assert row["cost_source"] == "reported" and row["error_type"] is None
        assert json.loads(row["metadata_json"]) == final["metadata"]
    assert sum(r["cost_usd"] for r in by_response.values() if r["error_type"] is None) == pytest.approx(
        sum(final["metadata"]["costs"]["total_tokens"] for _, final in completed), rel=1e-12
    )
    for status in (429, 500, 422):
        assert sum(r["http_status"] == status for r in rows) == 2
    assert sum(r["error_type"] is not None for r in rows) == len(PLAN) - len(completed)
    assert {json.loads(r["labels"])["team"] for r in rows} == {"t0", "t1"}
    assert all(r["key_fingerprint"] and r["key_fingerprint"] != API_KEY for r in rows)
    assert journal_files(tmp_path) == []
    assert run_verify(tap.db).exit_code == 0
    secret = API_KEY.encode()
    assert secret not in files_while_running and secret not in all_bytes(tmp_path)
    assert API_KEY not in tap.output()


def test_locked_database_mid_run_traffic_flows_then_rows_arrive(tmp_path, simulator):
    tap = start_tap(tmp_path, simulator.url)
    client = openai.OpenAI(base_url=tap.base_url, api_key=API_KEY, max_retries=0, timeout=30)
    try:
        send(client, 0, "chat", False, None)
        wait_until(lambda: row_count(tap.db) == 1)
        blocker = sqlite3.connect(tap.db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        answers = [
            client.chat.completions.create(model="pulze", messages=[{"role": "user", "content": f"q{i}"}])
            for i in range(10)
        ]
        assert all(a.usage.total_tokens for a in answers)  # served while the log is locked
        wait_until(lambda: tap.metric("llmtap_internal_errors_total", stage="audit") >= 1, timeout=15)
        assert tap.metric("llmtap_audit_queue_depth") == 10
        blocker.execute("ROLLBACK")
        blocker.close()
        wait_until(lambda: row_count(tap.db) == 11, timeout=15)
        assert tap.metric("llmtap_audit_queue_depth") == 0
        assert tap.metric("llmtap_audit_dropped_total") == 0
    finally:
        client.close()
        tap.stop()
    assert {a.id for a in answers} <= {r["response_id"] for r in db_rows(tap.db)}


def stream_fully(client: openai.OpenAI, prompt: str) -> str:
    """A streamed completion read to the end of the HTTP body; returns the response id."""
    with client.chat.completions.with_streaming_response.create(
        model="pulze",
        messages=[{"role": "user", "content": prompt}],
        stream=True,
    ) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
    return json.loads(events[0])["id"]


def test_kill_9_under_load_loses_no_received_response_and_duplicates_none(tmp_path, simulator):
    """20 rounds: 4 threads send traffic, the proxy is killed at a random moment, restarted on the same DB."""
    simulator.chunk_delay = 0.002
    rng = random.Random(20240601)
    db = tmp_path / "llmtap.db"
    received: list[str] = []
    lock = threading.Lock()

    def client_loop(stop: threading.Event, base_url: str, worker: int) -> None:
        client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=10)
        n = 0
        while not stop.is_set():
            n += 1
            prompt = f"w{worker} n{n} {rng.random()}"
            try:
                if n % 2:
                    rid = stream_fully(client, prompt)
                else:
                    rid = client.chat.completions.create(
                        model="pulze", messages=[{"role": "user", "content": prompt}]
                    ).id
            except (openai.APIError, httpx.HTTPError, ValueError, IndexError):
                continue  # the proxy died under this request: the client did not receive it
            with lock:
                received.append(rid)
        client.close()

    for _ in range(20):
        tap = start_tap(tmp_path, simulator.url, db=db)
        stop = threading.Event()
        workers = [threading.Thread(target=client_loop, args=(stop, tap.base_url, w)) for w in range(4)]
        before = len(received)
        for w in workers:
            w.start()
        wait_until(lambda: len(received) > before, timeout=15)  # traffic is flowing
        time.sleep(rng.uniform(0.02, 0.3))
        tap.kill()
        stop.set()
        for w in workers:
            w.join(30)
    AuditSink(Settings(db=str(db)), Health()).close()  # the next start replays the last journal
    rows = db_rows(db)
    counts: dict[str, int] = {}
    for row in rows:
        if row["response_id"]:
            counts[row["response_id"]] = counts.get(row["response_id"], 0) + 1
    assert len(received) > 100
    missing = [rid for rid in received if rid not in counts]
    assert missing == []
    assert [rid for rid, n in counts.items() if n > 1] == []
    assert journal_files(tmp_path) == []
    assert run_verify(db).exit_code == 0
