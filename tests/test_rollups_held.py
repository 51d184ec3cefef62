"""Rows held back from the rollups while a writer works off a backlog (``rollups.HOLD_ROWS``).

A batch applied with more lines waiting may leave its rows' rollups unwritten; ``rolled_up``
records the last row whose rollups are written, in the transaction that writes them. Reports
read the rows after it themselves, so they equal ``--exact`` at every step; a writer that
stops without writing them (``kill -9``) reads them back when it starts; rows are rolled up
before retention deletes them (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

from audit_helpers import NOW, db_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_rollups import assert_rollups_equal_rows
from test_rollups_fold import (
    DAY,
    DAY0,
    RANGES,
    assert_daily_is_hourly_added_up,
    assert_reports_equal_exact,
    invoke,
    record_line,
    traffic,
)

from llmtap.audit import rollups
from llmtap.audit.sqlite import AuditStore


def rolled_up(conn) -> int:
    return conn.execute("SELECT last_id FROM rolled_up").fetchone()[0]


def apply_with_backlog(store, lines: list[str], cuts: list[int], more: list[bool]) -> None:
    """``lines`` in batches cut at ``cuts``, each batch said to have more lines behind it or not."""
    encoded = [line.encode() for line in lines]
    offset, start = 0, 0
    ends = [*sorted({c % (len(encoded) + 1) for c in cuts}), len(encoded)]
    for n, cut in enumerate(end for end in ends if end):
        if cut <= start:
            continue
        batch = encoded[start:cut]
        offset += sum(len(line) + 1 for line in batch)
        store.apply(1, batch, offset, more=more[n % len(more)] if more else False)
        start = cut


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=traffic(),
    cuts=st.lists(st.integers(0, 40), max_size=6),
    more=st.lists(st.booleans(), min_size=1, max_size=6),
    hold=st.sampled_from([1, 7, 20_000]),
)
def test_sqlite_reports_equal_the_row_scan_while_rows_are_held_and_after_a_crash(
    tmp_path_factory, monkeypatch, lines, cuts, more, hold
):
    path = tmp_path_factory.mktemp("held") / "llmtap.db"
    with monkeypatch.context() as patch:
        patch.setattr(rollups, "HOLD_ROWS", hold)
        store = AuditStore(str(path), fsync_batch=False, capture_content=False, rollup_labels=("team",))
        apply_with_backlog(store, lines, cuts, [*more[:-1], True])  # the last batch says more: rows stay held
        held = len(store._held)
        last_id = rolled_up(store.conn)
        assert store.conn.execute("SELECT count(*) FROM exchanges WHERE id > ?", (last_id,)).fetchone()[0] == held
        assert held <= max(hold - 1, 0) + len(lines)
        assert_reports_equal_exact(str(path), RANGES)  # the held rows read from rows
        if held:
            assert f"{held:,} row" in json.loads(invoke("--db", str(path), "--format", "json"))["source"]
        store.conn.close()  # as kill -9: the held rows' rollups never written
        store = AuditStore(str(path), fsync_batch=False, capture_content=False, rollup_labels=("team",))
        assert len(store._held) == held  # read back
        store.release_rollups()
        assert rolled_up(store.conn) == (db_rows(path)[-1]["id"] if lines else 0)
        assert_rollups_equal_rows(store.conn)
        assert_daily_is_hourly_added_up(store.conn)
        store.close()
    assert_reports_equal_exact(str(path), RANGES)
    assert "not rolled up" not in json.loads(invoke("--db", str(path), "--format", "json"))["source"]


def test_a_backlog_writes_its_rollups_once_for_many_batches(tmp_path):
    store = AuditStore(str(tmp_path / "llmtap.db"), fsync_batch=False, capture_content=False)
    for n in range(5):
        batch = [record_line(10 * n + i, NOW - 3600 + 10 * n + i).encode() for i in range(10)]
        store.apply(1, batch, n + 1, more=n < 4)
        rolled = store.conn.execute("SELECT coalesce(sum(requests), 0) FROM rollups").fetchone()[0]
        assert rolled == (50 if n == 4 else 0)  # written with the batch that had nothing behind it
    assert rolled_up(store.conn) == 50
    store.close()


def test_rows_are_rolled_up_before_retention_deletes_them(tmp_path):
    store = AuditStore(str(tmp_path / "llmtap.db"), fsync_batch=False, capture_content=False)
    old = [record_line(i, NOW - 40 * DAY + i).encode() for i in range(6)]
    store.apply(1, old, 1, more=True)
    assert store.prune(NOW - 30 * DAY, 100) == 6
    assert not store._held and rolled_up(store.conn) == 6
    assert store.conn.execute("SELECT sum(requests) FROM rollups").fetchone()[0] == 6  # outlive their rows
    store.close()


def test_postgres_an_instance_holding_rows_and_one_restarting_report_exactly(pg_url, monkeypatch):
    from llmtap.audit import postgres

    monkeypatch.setattr(rollups, "HOLD_ROWS", 20)
    steady = postgres.PostgresStore(pg_url, "i-steady", capture_content=False, rollup_labels=("team",))
    busy = postgres.PostgresStore(pg_url, "i-busy", capture_content=False, rollup_labels=("team",))
    try:
        for day in range(3):
            lines = [
                record_line(i, DAY0 + day * DAY + i * 2900, labels={"team": "ads" if i % 3 else "search"}).encode()
                for i in range(24)
            ]
            steady.apply(1, lines[:12], 10 * day + 1)
            busy.apply(1, lines[12:], 10 * day + 1, more=True)
        assert len(busy._held) == 12 and not steady._held  # 12, 24: released; then 12 held
        assert_reports_equal_exact(pg_url, RANGES)
        busy.conn.close()  # as kill -9
        busy = postgres.PostgresStore(pg_url, "i-busy", capture_content=False, rollup_labels=("team",))
        assert len(busy._held) == 12
        busy.apply(1, [record_line(77, DAY0 + 3 * DAY + 5).encode()], 100)  # nothing behind it: released
        assert not busy._held
        assert_rollups_equal_rows(busy.conn, postgres=True)
        assert_daily_is_hourly_added_up(busy.conn, postgres=True)
        assert_reports_equal_exact(pg_url, RANGES)
    finally:
        steady.close()
        busy.close()
