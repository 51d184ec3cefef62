"""Daily rollups folded once per closed day: hourly rollups per batch, each day before the
watermark added up into ``rollups_daily``. For generated batches (late rows, rows without a
start time, errors, unknown costs, days folded a few per batch) every report from rollups
equals ``--exact`` and the daily rows equal the hourly ones added up; an upgraded database's
stale daily rows are replaced; the migrations set the watermark; a fleet with a lagging
instance still reports exactly (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import math
import uuid
from collections import defaultdict
from decimal import Decimal

from audit_helpers import NOW, make_record
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_rollups import apply_in_batches, assert_rollups_equal_rows, assert_same_report

from llmtap.audit import rollups
from llmtap.audit.report import report
from llmtap.audit.sqlite import MIGRATIONS, AuditStore, add_rollups

DAY = 86400
DAY0 = math.floor(NOW / DAY) * DAY - 6 * DAY  # six whole days ago: every generated row is in the past
GROUPINGS = (("model",), ("day", "status"), ("hour",), ("label:team", "key"), ("provider", "instance"))


def record_line(i: int, start: float | None, draw=None, **changes) -> str:
    values = dict(
        exchange_id=f"ex-{uuid.uuid4().hex}",
        request_start=start,
        request_end=None if start is None else start + 0.01,
        response_start=None if start is None else start + 0.2,
        first_token_at=None if start is None else start + 0.3,
        response_end=None if start is None else start + 1.5,
    )
    values.update(changes)
    return make_record(i, **values).to_json()


@st.composite
def traffic(draw) -> list[tuple[float, str]]:
    """(arrival order, journal line): rows over five days at odd times (hour and day edges), a
    few without a start time, errors, unknown and deferred costs, labels; a late row arrives
    as if days later (its day may be folded by then)."""
    out = []
    for i in range(draw(st.integers(1, 40))):
        day = draw(st.integers(0, 4))
        second = draw(st.sampled_from([0.0, 0.5, 3599.999, 3600.0, 7300.25, 43210.0, 82800.0, 86399.5]))
        start = None if draw(st.integers(0, 15)) == 0 else DAY0 + day * DAY + second
        cost = draw(st.sampled_from([None, 0.0, 0.1, 17 * 0.2 / 1e6, 0.00066]))
        status, error = draw(st.sampled_from([(200, None), (429, "http_429"), (None, "client_disconnected")]))
        line = record_line(
            i,
            start,
            http_status=status,
            error_type=error,
            response_model=draw(st.sampled_from([None, "m-a", "m-b"])),
            labels=draw(st.sampled_from([None, {"team": "search"}, {"team": "ads"}])),
            input_tokens=draw(st.sampled_from([None, 0, 7, 1000])),
            cost_usd=cost,
            cost_nanousd=None if cost is None or draw(st.booleans()) else round(Decimal(repr(cost)).scaleb(9)),
            cost_source=draw(st.sampled_from(["reported", "unknown", "deferred"])),
            cost_savings_usd=draw(st.sampled_from([None, 0.01])),
        )
        late = draw(st.integers(0, 5)) == 0
        arrival = (start if start is not None else DAY0) + (draw(st.integers(1, 3)) * DAY if late else 0)
        out.append((arrival, line))
    return [line for _, line in sorted(out, key=lambda pair: pair[0])]


def watermarks(conn, postgres: bool = False) -> dict:
    owner = "instance_id" if postgres else "''"
    sql = f"SELECT {owner}, daily_before FROM rollup_watermarks"
    return dict(conn.execute(sql).fetchall())


def assert_daily_is_hourly_added_up(conn, postgres: bool = False) -> None:
    """The daily rows of each day before the watermark (of each instance) equal its hourly rows
    added up, key by key and value by value (decimals, histograms); none of a later day is
    needed for a report (whatever is there is replaced when its day is folded)."""
    marks = watermarks(conn, postgres)
    owner = "instance_id" if postgres else "''"
    columns = ", ".join(rollups.KEY_COLUMNS + rollups.VALUE_COLUMNS)
    tables = {}
    for table in rollups.PERIODS:
        found: dict = defaultdict(rollups.empty)
        for row in conn.execute(f"SELECT {owner}, {columns} FROM {table}").fetchall():
            key = rollups.stored_key(row[1:])
            mark = marks.get(row[0], math.inf)
            if key[0] < mark:
                day = (row[0], rollups.period_of(key[0], DAY), *key[1:])
                rollups.merge(found[day], rollups.read_values(row[1 + len(rollups.KEY_COLUMNS) :]))
        tables[table] = dict(found)
    assert tables["rollups_daily"].keys() == tables["rollups"].keys()
    for key, values in tables["rollups"].items():
        assert tables["rollups_daily"][key] == values, key


def invoke(*args: str) -> str:
    """The report's standard output (an empty range says so on standard error)."""
    result = CliRunner().invoke(report, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def assert_reports_equal_exact(db: str, ranges, *, labelled: bool = True) -> None:
    """Every grouping over every range: from rollups equal to ``--exact`` (a label not rolled
    up: from rows)."""
    for by in GROUPINGS:
        for window in ranges:
            args = ["--db", db, *(a for name in by for a in ("--by", name)), *window, "--format", "json"]
            fast, exact = json.loads(invoke(*args)), json.loads(invoke(*args, "--exact"))
            assert exact["source"] == "rows"
            if not labelled and any(name.startswith("label:") for name in by):
                assert fast["source"].startswith("rows (the label")
                assert fast["rows"] == exact["rows"] and fast["totals"] == exact["totals"]
                continue
            assert "rollups" in fast["source"], fast["source"]
            if "hour" in by:
                assert "daily" not in fast["source"]
            if not exact["totals"]["requests"]:  # an empty range (the row scan's sums are NULL, the rollups' 0)
                assert not fast["totals"]["requests"] and fast["rows"] == exact["rows"] == []
                continue
            assert_same_report(fast, exact)


def iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat()


RANGES = (
    (),  # open at both ends: the rows without a start time too
    ("--since", iso(DAY0 + DAY + 5 * 3600), "--until", iso(DAY0 + 4 * DAY)),  # hour-aligned
    ("--since", iso(DAY0 + DAY / 2 + 123.4), "--until", iso(DAY0 + 3.7 * DAY + 17)),  # not aligned
    ("--until", iso(DAY0 + 2 * DAY)),
    ("--since", iso(DAY0 + 2 * DAY + 1800)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=traffic(), cuts=st.lists(st.integers(0, 40), max_size=6), fold_days=st.sampled_from([1, 2, 7]))
def test_sqlite_reports_from_folded_days_equal_the_row_scan(tmp_path_factory, monkeypatch, lines, cuts, fold_days):
    path = tmp_path_factory.mktemp("fold") / "llmtap.db"
    with monkeypatch.context() as patch:
        patch.setattr(rollups, "FOLD_DAYS", fold_days)  # a few days a batch: the next batch goes on
        store = AuditStore(str(path), fsync_batch=False, capture_content=False, rollup_labels=("team",))
        try:
            apply_in_batches(store, lines, cuts)
            apply_in_batches(store, lines, [])  # replayed: nothing changes
            assert_rollups_equal_rows(store.conn)
            assert_daily_is_hourly_added_up(store.conn)
            mark = watermarks(store.conn).get("")
            if any(json.loads(line)["request_start"] is not None for line in lines):
                assert mark % DAY == 0 and DAY0 <= mark <= DAY0 + 5 * DAY
            else:
                assert mark is None  # nothing but rows without a start time: in both tables
        finally:
            store.close()
    assert_reports_equal_exact(str(path), RANGES)


def test_the_latest_day_of_a_busy_store_is_folded_in_batches_of_days(tmp_path, monkeypatch):
    monkeypatch.setattr(rollups, "FOLD_DAYS", 2)
    store = AuditStore(str(tmp_path / "llmtap.db"), fsync_batch=False, capture_content=False)
    first = [record_line(i, DAY0 + i * 3 * 3600 + 5).encode() for i in range(40)]  # five days in one batch
    store.apply(1, first, 100)
    assert watermarks(store.conn)[""] == DAY0 + 2 * DAY  # at most two days a batch
    store.apply(1, [record_line(50, DAY0 + 5 * DAY + 7200).encode()], 200)
    assert watermarks(store.conn)[""] == DAY0 + 4 * DAY
    store.apply(1, [record_line(51, DAY0 + 5 * DAY + 7300).encode()], 300)
    assert watermarks(store.conn)[""] == DAY0 + 5 * DAY  # caught up: the last day is still open
    assert_daily_is_hourly_added_up(store.conn)
    assert_rollups_equal_rows(store.conn, labelled=False)
    late = [record_line(60, DAY0 + DAY + 60).encode(), record_line(61, None).encode()]
    store.apply(1, late, 400)  # a folded day's late row and a row without a start time: both tables
    assert_daily_is_hourly_added_up(store.conn)
    assert_rollups_equal_rows(store.conn, labelled=False)
    daily = store.conn.execute("SELECT count(*) FROM rollups_daily WHERE hour >= ?", (DAY0 + 5 * DAY,)).fetchone()[0]
    assert daily == 0  # an open day is in the hourly rollups only
    store.close()
    assert_reports_equal_exact(str(tmp_path / "llmtap.db"), RANGES, labelled=False)


def _as_before_watermarks(store: AuditStore) -> None:
    """The database as the release that kept daily rollups per batch left it: its daily table
    holds every day, the latest one included; no watermark table."""
    conn = store.conn
    columns = [*rollups.SOURCE_COLUMNS, "labels"]
    rows = [(r[:-1], r[-1] and json.loads(r[-1])) for r in conn.execute(f"SELECT {', '.join(columns)} FROM exchanges")]
    conn.execute("DELETE FROM rollups_daily")
    add_rollups(conn, rollups.aggregate(rows, (), rollups.sqlite_decimal), tables=("rollups_daily",))
    conn.execute("DROP TABLE rollup_watermarks")
    conn.execute("DROP TABLE rolled_up")
    conn.execute(
        f"PRAGMA user_version = {MIGRATIONS.index(next(m for m in MIGRATIONS if m.__name__ == '_create_rollup_watermarks'))}"
    )


def test_an_upgraded_database_gets_its_watermark_and_its_stale_latest_day_is_replaced(tmp_path):
    path = str(tmp_path / "llmtap.db")
    store = AuditStore(path, fsync_batch=False, capture_content=False)
    store.apply(1, [record_line(i, DAY0 + i * 4000).encode() for i in range(50)], 100)  # ~2.3 days
    _as_before_watermarks(store)
    latest = DAY0 + 49 * 4000
    # a daily row of the latest day whose key no hourly row has (as after an odd history): replaced means gone
    conn = store.conn
    conn.execute(
        "INSERT INTO rollups_daily (hour, key, model, requests, errors, unknown_cost, unpriced, duration, ttft) "
        "VALUES (?, ?, 'ghost', 5, 0, 0, 0, '{}', '{}')",
        (rollups.period_of(latest, DAY), b"\x00" * 16),
    )
    store.close()
    store = AuditStore(path, fsync_batch=False, capture_content=False)  # migrates
    assert watermarks(store.conn) == {"": rollups.period_of(latest, DAY)}  # the latest hourly rollup's day
    # more rows of that day go to the hourly rollups only: its daily rows go stale
    store.apply(1, [record_line(100 + i, latest + 60 + i).encode() for i in range(5)], 200)
    assert watermarks(store.conn)[""] == rollups.period_of(latest, DAY)
    stale = store.conn.execute(
        "SELECT sum(requests) FROM rollups_daily WHERE hour = ?", (rollups.period_of(latest, DAY),)
    )
    assert (
        stale.fetchone()[0]
        == len([i for i in range(50) if rollups.period_of(DAY0 + i * 4000, DAY) == rollups.period_of(latest, DAY)]) + 5
    )
    # the next day (past the grace hour) folds it: replaced, never added to
    store.apply(1, [record_line(200, rollups.period_of(latest, DAY) + DAY + 2 * 3600).encode()], 300)
    assert watermarks(store.conn)[""] == rollups.period_of(latest, DAY) + DAY
    assert store.conn.execute("SELECT count(*) FROM rollups_daily WHERE model = 'ghost'").fetchone()[0] == 0
    assert_daily_is_hourly_added_up(store.conn)
    assert_rollups_equal_rows(store.conn, labelled=False)
    store.close()
    assert_reports_equal_exact(path, RANGES, labelled=False)


def test_a_report_of_a_database_not_migrated_to_watermarks_reads_its_daily_rollups(tmp_path):
    path = str(tmp_path / "llmtap.db")
    store = AuditStore(path, fsync_batch=False, capture_content=False)
    store.apply(1, [record_line(i, DAY0 + i * 4000).encode() for i in range(50)], 100)
    _as_before_watermarks(store)
    store.close()
    out = json.loads(invoke("--db", path, "--by", "model", "--format", "json"))  # no write: not migrated
    assert out["source"] == "daily rollups"  # kept per batch: complete throughout
    assert_same_report(out, json.loads(invoke("--db", path, "--by", "model", "--format", "json", "--exact")))


# --- PostgreSQL: a watermark per instance -------------------------------------------------------


def test_postgres_two_instances_one_lagging_report_exactly(pg_url, monkeypatch):
    from llmtap.audit import postgres

    monkeypatch.setattr(rollups, "FOLD_DAYS", 1)
    ahead = postgres.PostgresStore(pg_url, "i-ahead", capture_content=False, rollup_labels=("team",))
    behind = postgres.PostgresStore(pg_url, "i-behind", capture_content=False, rollup_labels=("team",))
    try:
        for day in range(5):
            lines = [
                record_line(i, DAY0 + day * DAY + i * 1900, labels={"team": "ads" if i % 3 else "search"}).encode()
                for i in range(40)
            ]
            ahead.apply(1, lines[:20], 100 * day + 1)
            ahead.apply(1, lines[20:], 100 * day + 2)
            if day < 2:
                behind.apply(1, [record_line(i, DAY0 + day * DAY + i * 3000 + 7).encode() for i in range(25)], day + 1)
        ahead.apply(1, [record_line(99, DAY0 + DAY + 5, cost_usd=None).encode(), record_line(98, None).encode()], 900)
        marks = watermarks(ahead.conn, postgres=True)
        assert marks["i-behind"] < marks["i-ahead"] == DAY0 + 4 * DAY
        assert_rollups_equal_rows(ahead.conn, postgres=True)
        assert_daily_is_hourly_added_up(ahead.conn, postgres=True)
        assert_reports_equal_exact(pg_url, RANGES)
    finally:
        ahead.close()
        behind.close()


def test_postgres_migration_sets_each_instances_watermark_and_a_sidecar_role_folds(pg_cluster, pg_url, monkeypatch):
    from llmtap.audit import postgres

    stores = [postgres.PostgresStore(pg_url, name, capture_content=False) for name in ("i-a", "i-b")]
    stores[0].apply(1, [record_line(i, DAY0 + i * 5000).encode() for i in range(40)], 100)
    stores[1].apply(1, [record_line(i, DAY0 + i * 900).encode() for i in range(20)], 100)
    stores[1].apply(1, [record_line(77, None).encode()], 200)  # no start time: the release before added it up
    conn = stores[0].conn
    number = postgres.MIGRATIONS.index(postgres._create_rollup_watermarks) + 1
    conn.execute("DROP TABLE rollup_watermarks")  # as a database of the release before
    conn.execute("DROP TABLE rolled_up")
    conn.execute("UPDATE rollups_daily SET hour = 'NaN' WHERE hour = '-Infinity'")  # by day under -inf // 86400
    conn.execute("DELETE FROM llmtap_schema WHERE version >= %s", (number,))
    for store in stores:
        store.close()
    conn = postgres.connect(pg_url)
    role = f"sidecar_{uuid.uuid4().hex[:8]}"
    pg_cluster.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    try:
        assert number in postgres.migrate(conn, grant=(role,))
        assert conn.execute("SELECT count(*) FROM rollups_daily WHERE hour = 'NaN'").fetchone()[0] == 0
        assert watermarks(conn, postgres=True) == {
            "i-a": rollups.period_of(DAY0 + 39 * 5000, DAY),
            "i-b": rollups.period_of(DAY0 + 19 * 900, DAY),
        }
        # the latest day of i-a kept per batch: a stale daily row only a DELETE could remove
        conn.execute(
            "INSERT INTO rollups_daily (instance_id, hour, key, model, requests, errors, unknown_cost, unpriced, "
            "duration, ttft) VALUES ('i-a', %s, %s, 'ghost', 5, 0, 0, 0, '{}', '{}')",
            (rollups.period_of(DAY0 + 39 * 5000, DAY), b"\x00" * 16),
        )
        conn.close()
        monkeypatch.setenv("PGPASSWORD", "pw")
        store = postgres.PostgresStore(pg_url.replace("postgres@", f"{role}@"), "i-a", capture_content=False)
        assert not store._may_delete_daily  # granted INSERT, SELECT, UPDATE: the ghost is zeroed
        store.apply(2, [record_line(300, DAY0 + 6 * DAY + 7200).encode()], 100)  # folds i-a's last day
        assert watermarks(store.conn, postgres=True)["i-a"] == DAY0 + 6 * DAY
        ghost = store.conn.execute("SELECT requests, duration::text FROM rollups_daily WHERE model = 'ghost'")
        assert ghost.fetchall() == [(0, "{}")]
        store.close()
    finally:
        pg_cluster.psql(f"DROP OWNED BY {role}", db=pg_url.rsplit("/", 1)[1])
        pg_cluster.psql(f"DROP ROLE {role}")
    from pg import PASSWORD

    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    conn = postgres.connect(pg_url)
    conn.execute("DELETE FROM rollups_daily WHERE model = 'ghost'")  # zeroed: it adds nothing anyway
    assert_daily_is_hourly_added_up(conn, postgres=True)
    assert_rollups_equal_rows(conn, postgres=True, labelled=False)
    conn.close()


# --- the writer's shortcuts are the same sums -----------------------------------------------------

_TEXT = st.one_of(st.none(), st.sampled_from(["a", "b", ""]))
_COUNT = st.one_of(st.none(), st.integers(0, 2**40))
_AMOUNT = st.one_of(st.none(), st.sampled_from([0.0, 0.1, 17 * 0.2 / 1e6, 0.00066, 1e-12, 3.5]))
_SECONDS = st.one_of(st.none(), st.floats(0, 1e5, allow_nan=False))
_KINDS = {
    "request_start": st.one_of(st.none(), st.floats(0, 2e9, allow_nan=False)),
    "http_status": st.one_of(st.none(), st.sampled_from([200, 429])),
    "record_schema": st.one_of(st.none(), st.integers(1, 3)),
    "cost_source": st.one_of(st.none(), st.sampled_from(["reported", "deferred", "unknown"])),
    "cost_nanousd": _COUNT,
    "cost_usd": _AMOUNT,
    "cost_savings_usd": _AMOUNT,
    "duration_s": _SECONDS,
    "ttft_s": _SECONDS,
}
_SOURCE = st.tuples(
    *(_KINDS.get(name, _COUNT if name.endswith("tokens") else _TEXT) for name in rollups.SOURCE_COLUMNS)
)


@settings(max_examples=300, deadline=None)
@given(source=_SOURCE)
def test_the_values_of_one_row_are_those_of_its_columns(source):
    for decimal in (rollups.sqlite_decimal, rollups.postgres_decimal):
        assert rollups.values_of([source], decimal) == rollups._values_of_many([source], decimal)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.lists(_SOURCE, min_size=1, max_size=3), min_size=2, max_size=4))
def test_merge_adds_as_the_sums_of_all_rows_do(values):
    merged = rollups.empty()
    for sources in values:
        part = rollups.values_of(sources, rollups.sqlite_decimal)
        rollups.merge(merged, part)
    everything = rollups.values_of([s for sources in values for s in sources], rollups.sqlite_decimal)
    assert merged == everything
