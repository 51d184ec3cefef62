"""OTLP log records from the PostgreSQL store: the per-instance cursor in the fleet's database."""

from __future__ import annotations

import psycopg
import pytest
from conftest import API_KEY, start_tap
from otlp_receiver import OTLPHTTPReceiver
from test_logexport import PROMPT, by_exchange, chat

from llmtap.audit.logexport import NOT_EXPORTED, _attribute_value

pytestmark = pytest.mark.timeout(600)


def pg_rows(url: str, sql: str, params=()) -> list[dict]:
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(sql, params).fetchall()


def test_two_instances_one_database_each_exports_its_own_rows_once(tmp_path, simulator, pg_url):
    with OTLPHTTPReceiver() as receiver:
        taps = []
        try:
            for name in ("a", "b"):
                workdir = tmp_path / name
                workdir.mkdir()
                taps.append(
                    start_tap(
                        workdir,
                        simulator.url,
                        "--journal-dir",
                        str(workdir / "journal"),
                        "--instance",
                        name,
                        "--otlp-logs",
                        db=pg_url,
                        env={"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": receiver.logs_url},
                    )
                )
            for tap in taps:
                with tap.client() as client:
                    for i in range(4):
                        chat(client, stream=bool(i % 2))
            received = receiver.wait_logs(8, timeout=30)
        finally:
            for tap in taps:
                tap.stop()
    rows = pg_rows(pg_url, "SELECT * FROM exchanges ORDER BY id")
    assert len(rows) == len(received) == 8
    got = by_exchange(received)
    for row in rows:
        for digest, shown in (("prev_digest", "prev_hash"), ("row_digest", "row_hash")):  # sent as shown
            row[shown] = "sha256:" + row.pop(digest).hex()
        expected = {
            f"llmtap.{k}": _attribute_value(v) for k, v in row.items() if v is not None and k not in NOT_EXPORTED
        }
        assert got[row["exchange_id"]].attributes == expected
    cursors = {
        c["instance_id"]: c["last_id"]
        for c in pg_rows(pg_url, "SELECT instance_id, max(last_id) AS last_id FROM log_export GROUP BY instance_id")
    }
    last = {}
    for row in rows:
        last[row["instance_id"]] = row["id"]
    assert cursors == last and len(cursors) == 2  # one cursor per instance, at its own last row
    assert {r.attributes["llmtap.instance"] for r in received} == {"a", "b"}
    assert API_KEY.encode() not in receiver.raw_bytes() and PROMPT.encode() not in receiver.raw_bytes()
