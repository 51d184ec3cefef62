"""An audit log written by the release before record schema 2 opens, migrates, verifies and reports.

The fixture (``tests/fixtures/v1_audit``, made by ``make_v1_audit.py`` from that release) holds
four rows in the database and two records still in a journal generation, as a proxy killed
before its writer caught up leaves them.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from audit_helpers import db_rows
from conftest import API_KEY, LLMTAP, start_tap

from llmtap.audit.sqlite import MIGRATIONS
from llmtap.devtools.simulator import Simulator
from llmtap.record import RECORD_SCHEMA

FIXTURE = Path(__file__).parent / "fixtures" / "v1_audit"


def rows(db: Path) -> dict[str, dict]:
    return {row["exchange_id"]: row for row in db_rows(db)}


def test_a_v1_audit_log_migrates_keeps_verifying_and_reports_old_rows_as_written(tmp_path: Path) -> None:
    shutil.copytree(FIXTURE, tmp_path / "audit")
    db = tmp_path / "audit" / "llmtap.db"
    before = rows(db)
    assert len(before) == 4 and "record_schema" not in next(iter(before.values()))
    pending = [json.loads(line) for line in (tmp_path / "audit" / "llmtap.db.journal.1").read_text().splitlines()]
    assert len(pending) == 2 and all("record_schema" not in line for line in pending)

    with Simulator(chunk_delay=0) as sim:
        tap = start_tap(tmp_path, sim.url, db=db)
        try:
            client = tap.client()
            client.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "new"}])
            client.responses.create(model="gpt-4o-mini", input="a new family")
            client.close()
            tap.wait_records(2)
        finally:
            assert tap.stop() == 0

    after = rows(db)
    assert len(after) == 4 + 2 + 2
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    conn.close()
    for exchange_id, old in before.items():  # every old value as written, new columns NULL
        row = after[exchange_id]
        assert {k: row[k] for k in old} == old
        assert row["record_schema"] is None and row["family"] is None
    replayed = [after[line["exchange_id"]] for line in pending]
    assert [r["input_tokens"] for r in replayed] == [line["input_tokens"] for line in pending]
    assert all(r["record_schema"] is None for r in replayed)  # written by the old release: schema 1
    new = [r for r in after.values() if r["exchange_id"] not in before and r not in replayed]
    assert sorted(r["family"] for r in new) == ["chat_completions", "openai_responses"]
    assert {r["record_schema"] for r in new} == {RECORD_SCHEMA}

    verify = subprocess.run([LLMTAP, "audit", "verify", "--db", str(db)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = subprocess.run(
        [LLMTAP, "report", "--db", str(db), "--by", "schema", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    by_schema = {row["schema"]: row for row in json.loads(report.stdout)["rows"]}
    old_rows = [*before.values(), *replayed]
    assert by_schema[1]["requests"] == 6
    assert by_schema[1]["input_tokens"] == sum(r["input_tokens"] or 0 for r in old_rows)
    assert by_schema[1]["cost_usd"] == pytest.approx(sum(r["cost_usd"] or 0 for r in old_rows))
    assert by_schema[RECORD_SCHEMA]["requests"] == 2
    assert API_KEY not in db.read_text(errors="replace")
