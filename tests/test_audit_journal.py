"""The journal and the writer process: exactly-once replay, kill -9, rotation, faults.

Unit tests with hand-built records; processes are real (the writer, children killed with -9).
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from audit_helpers import (
    db_rows,
    journal_files,
    make_record,
    new_sink,
    row_count,
    write_records,
)
from conftest import wait_until

from llmtap.audit.sqlite import AuditStore, connect, verify_chain
from llmtap.health import Health
from llmtap.sinks.audit import AuditLogInUse

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
