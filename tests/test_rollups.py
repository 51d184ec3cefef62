"""Hourly rollups: equal to their rows for random traffic (SQLite and PostgreSQL), read by the
report exactly as a row scan would (percentiles within one bucket), backfilled on upgrade,
kept by retention, untouched by replays and kill -9."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import sqlite3
import uuid
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest
from audit_helpers import NOW, make_record
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_report import traffic

from llmtap.audit import rollups
from llmtap.audit.report import DIMENSIONS, report
from llmtap.audit.sqlite import MIGRATIONS, AuditStore
from llmtap.config import Settings, SettingsError
from llmtap.health import Health
from llmtap.sinks.audit import AuditSink

HOUR0 = math.floor(NOW / 3600) * 3600 - 5 * 3600
FIXTURE = Path(__file__).parent / "fixtures" / "v1_audit"


def _decimal(value) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(format(value, ".15g"))


@st.composite
def records(draw) -> list[str]:
    """Journal lines: odd hours, unknown and deferred costs, errors, float-only (older) costs,
    labels, and replays of the same exchange."""
    lines = []
    for i in range(draw(st.integers(1, 25))):
        cost = draw(st.sampled_from([None, 0.0, 0.1, 0.2, 17 * 0.2 / 1e6, 0.00066]))
        status, error = draw(st.sampled_from([(200, None), (429, "http_429"), (None, "client_disconnected")]))
        start = HOUR0 + draw(st.sampled_from([0.0, 0.5, 3599.999, 3600.0, 7300.25, 4 * 3600 + 1]))
        record = make_record(
            i,
            exchange_id=f"ex-{uuid.uuid4().hex}",
            request_start=start,
            first_token_at=draw(st.sampled_from([None, start + 0.0004, start + 0.3])),
            response_end=start + draw(st.sampled_from([0.0005, 0.05, 1.7, 2.0, 3000.0])),
            http_status=status,
            error_type=error,
            response_model=draw(st.sampled_from([None, "m-a", "m-b"])),
            labels=draw(st.sampled_from([None, {"team": "search"}, {"team": "ads", "env": "prod"}, {"env": "x"}])),
            input_tokens=draw(st.sampled_from([None, 0, 7, 1000])),
            cached_input_tokens=draw(st.sampled_from([None, 3])),
            cost_usd=cost,
            cost_nanousd=None if cost is None or draw(st.booleans()) else round(Decimal(repr(cost)).scaleb(9)),
            cost_source=draw(st.sampled_from(["reported", "unknown", "deferred", "database"])),
            cost_savings_usd=draw(st.sampled_from([None, 0.0, 0.01, 0.1])),
        )
        line = record.to_json()
        lines.append(line)
        if draw(st.booleans()):
            lines.append(line)  # replayed
    return lines


#: The rollup key, in SQL over the rows (hour as the start of the UTC hour).
ROW_KEY = """CAST(request_start / 3600 AS INTEGER) * 3600.0, coalesce(response_model, request_model), provider,
    app_id, key_fingerprint, coalesce(CAST(http_status AS TEXT), error_type), operation, family,
    coalesce(record_schema, 1), instance, cost_source, {team}"""
ROW_SUMS = """count(*), sum(CASE WHEN error_type IS NOT NULL THEN 1 ELSE 0 END),
    sum(CASE WHEN cost_usd IS NULL AND coalesce(cost_source, '') != 'deferred' THEN 1 ELSE 0 END),
    sum(CASE WHEN cost_usd IS NULL AND error_type IS NULL THEN 1 ELSE 0 END), sum(input_tokens), sum(output_tokens), sum(total_tokens),
    sum(cached_input_tokens), sum(reasoning_tokens), sum(CASE WHEN cost_usd IS NOT NULL THEN cost_nanousd END)"""
ROLLUP_KEY = """hour, model, provider, app_id, key_fingerprint, status, operation, family, record_schema, instance,
    cost_source, {team}"""
ROLLUP_SUMS = ", ".join(f"sum({c})" for c in rollups.COUNTS + rollups.SUMS)


def row_aggregates(rows: list[dict]) -> dict[tuple, dict]:
    """Decimal money and exact durations per key, from the rows (not through ``rollups``)."""
    out: dict[tuple, dict] = defaultdict(lambda: {"cost": None, "savings": None, "durations": [], "ttfts": []})
    for row in rows:
        acc = out[row["key"]]
        if row["cost_usd"] is not None and row["cost_nanousd"] is None:
            acc["cost"] = (acc["cost"] or 0) + _decimal(row["cost_usd"])
        if row["cost_savings_usd"] is not None:
            acc["savings"] = (acc["savings"] or 0) + _decimal(row["cost_savings_usd"])
        if row["duration_s"] is not None:
            acc["durations"].append(row["duration_s"])
        if row["ttft_s"] is not None:
            acc["ttfts"].append(row["ttft_s"])
    return out


def nearest_rank(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[max(1, math.ceil(p * len(values))) - 1]


def assert_within_one_bucket(got: float, exact: float) -> None:
    lower, upper = rollups.bucket_bounds(rollups.bucket(exact))
    assert lower <= exact < upper
    assert got == (upper if math.isfinite(upper) else lower), (got, exact)


def assert_rollups_equal_rows(conn, *, postgres: bool = False, labelled: bool = True) -> None:
    """Every rollup sum, hourly and daily, equals the same aggregate over the rows, per key
    (with ``labelled``, the team label too); the daily ones for the days before the watermark
    (of each instance), the days the daily table holds complete."""
    for table, seconds in rollups.PERIODS.items():
        _assert_table_equals_rows(conn, table, seconds, postgres=postgres, labelled=labelled)


def _assert_table_equals_rows(conn, table: str, seconds: int, *, postgres: bool, labelled: bool) -> None:
    team_rows = "labels ->> 'team'" if postgres else "json_extract(labels, '$.team')"
    if not labelled:
        team_rows = "NULL"
    row_key = ROW_KEY.format(team=team_rows).replace("3600", str(seconds))
    if postgres:
        row_key = row_key.replace(
            f"CAST(request_start / {seconds} AS INTEGER) * {seconds}.0", f"floor(request_start / {seconds}) * {seconds}"
        )
    n = 12
    rows_where = rollups_where = "1 = 1"
    if table == "rollups_daily":
        rows_where, rollups_where = (
            _before_watermark("exchanges", "request_start", postgres),
            _before_watermark(table, "hour", postgres),
        )
    want = {
        tuple(r[:n]): tuple(int(v) if v is not None else None for v in r[n:])
        for r in conn.execute(
            f"SELECT {row_key}, {ROW_SUMS} FROM exchanges WHERE {rows_where} "
            f"GROUP BY {', '.join(map(str, range(1, n + 1)))}"
        )
    }
    rollup_key = ROLLUP_KEY.format(team=team_rows)
    got = {
        tuple(r[:n]): tuple(int(v) if v is not None else None for v in r[n:])
        for r in conn.execute(
            f"SELECT {rollup_key}, {ROLLUP_SUMS} FROM {table} WHERE {rollups_where} "
            f"GROUP BY {', '.join(map(str, range(1, n + 1)))}"
        )
    }
    norm = lambda d: {(_hour(k[0]), *k[1:]): v for k, v in d.items()}  # noqa: E731
    assert norm(got) == norm(want)
    # money (exact decimals) and histograms, per key
    money_cols = "cost_usd, cost_nanousd, cost_savings_usd, duration_s, ttft_s"
    rows = [
        {
            "key": tuple(r[:n]),
            **dict(zip(["cost_usd", "cost_nanousd", "cost_savings_usd", "duration_s", "ttft_s"], r[n:])),
        }
        for r in conn.execute(f"SELECT {row_key}, {money_cols} FROM exchanges WHERE {rows_where}")
    ]
    exact = row_aggregates(rows)
    stored: dict[tuple, rollups.Values] = defaultdict(rollups.empty)
    cols = ", ".join(rollups.VALUE_COLUMNS)
    for r in conn.execute(f"SELECT {rollup_key}, {cols} FROM {table} WHERE {rollups_where}"):
        rollups.merge(stored[tuple(r[:n])], rollups.read_values(r[n:]))
    assert {(_hour(k[0]), *k[1:]) for k in stored} == set(norm(want))
    stored = {(_hour(k[0]), *k[1:]): v for k, v in stored.items()}
    for key, acc in exact.items():
        key = (_hour(key[0]), *key[1:])
        values = stored[key]
        assert rollups.decimal_of(values, "cost_decimal_usd") == acc["cost"]
        assert rollups.decimal_of(values, "cost_savings_usd") == acc["savings"]
        for name, seconds in (("duration", acc["durations"]), ("ttft", acc["ttfts"])):
            counts = rollups.histogram(values, name)
            assert sum(counts.values()) == len(seconds)
            for p in (0.5, 0.95, 0.99):
                if seconds:
                    assert_within_one_bucket(rollups.percentile(counts, p), nearest_rank(seconds, p))


def _hour(hour) -> float | None:
    """A key's hour: a row without a start time has none (SQL's NULL), its rollup hour -inf."""
    return None if hour is None or float(hour) == -math.inf else float(hour)


def _before_watermark(table: str, column: str, postgres: bool) -> str:
    """SQL: the row of ``table`` is of a day before its store's (instance's) watermark, or has
    no start time (none: the daily rollups are complete)."""
    mine = f" WHERE w.instance_id = {table}.instance_id" if postgres else ""
    watermark = f"(SELECT daily_before FROM rollup_watermarks w{mine})"
    return f"({column} IS NULL OR {watermark} IS NULL OR {column} < {watermark})"


def apply_in_batches(store, lines: list[str], cuts: list[int]) -> None:
    encoded = [line.encode() for line in lines]
    offset, start = 0, 0
    for cut in [*sorted(set(c % (len(encoded) + 1) for c in cuts)), len(encoded)]:
        if cut <= start:
            continue
        batch = encoded[start:cut]
        offset += sum(len(line) + 1 for line in batch)
        store.apply(1, batch, offset)
        start = cut


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=records(), cuts=st.lists(st.integers(0, 60), max_size=4))
def test_sqlite_rollups_equal_their_rows(tmp_path_factory, lines, cuts):
    path = tmp_path_factory.mktemp("roll") / "llmtap.db"
    store = AuditStore(str(path), fsync_batch=False, capture_content=False, rollup_labels=("team", "key"))
    try:
        apply_in_batches(store, lines, cuts)
        apply_in_batches(store, lines, [])  # the whole journal replayed: no rollup changes
        assert_rollups_equal_rows(store.conn)
    finally:
        store.close()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=records(), cuts=st.lists(st.integers(0, 60), max_size=3))
def test_postgres_rollups_equal_their_rows(pg_cluster, monkeypatch, lines, cuts):
    from pg import PASSWORD

    from llmtap.audit.postgres import PostgresStore

    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    url = pg_cluster.create_database(f"r_{uuid.uuid4().hex[:12]}")
    stores = [PostgresStore(url, name, capture_content=False, rollup_labels=("team",)) for name in ("i-a", "i-b")]
    try:
        apply_in_batches(stores[0], lines, cuts)
        apply_in_batches(stores[1], lines[: len(lines) // 2], [])  # another sidecar's replays conflict, add nothing
        apply_in_batches(stores[0], lines, [])
        assert_rollups_equal_rows(stores[0].conn, postgres=True)
    finally:
        for store in stores:
            store.close()


def test_a_row_refused_one_by_one_adds_nothing(tmp_path):
    store = AuditStore(str(tmp_path / "llmtap.db"), fsync_batch=False, capture_content=False, rollup_labels=("team",))
    good = [make_record(i).to_json().encode() for i in range(3)]
    store.conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON exchanges WHEN NEW.exchange_id = 'ex-00001' "
        "BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    batch = store.apply(1, good, 10)
    assert len(batch.rejected) == 1
    assert store.conn.execute("SELECT sum(requests) FROM rollups").fetchone()[0] == 2
    assert_rollups_equal_rows(store.conn)
    store.close()


# --- the report from rollups equals the row scan ----------------------------------------------


@pytest.fixture(scope="module")
def rolled_db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rolled") / "llmtap.db"
    sink = AuditSink(Settings(db=str(path), metric_labels=("team",)), Health())
    for record in traffic(300, seed=11):
        sink.emit(record)
    sink.close()
    return path


def invoke(*args: str) -> str:
    result = CliRunner().invoke(report, list(args))
    assert result.exit_code == 0, result.output
    return result.output


PERCENTILE_COLUMNS = ("p50_s", "p95_s", "p99_s")


def assert_same_report(fast: dict, exact: dict, *, from_rollups: bool = True) -> None:
    assert [r.get(n) for r in fast["rows"] for n in fast["by"]] == [
        r.get(n) for r in exact["rows"] for n in exact["by"]
    ]
    for got, want in [*zip(fast["rows"], exact["rows"]), (fast["totals"], exact["totals"])]:
        assert {k: v for k, v in got.items() if k not in PERCENTILE_COLUMNS} == {
            k: v for k, v in want.items() if k not in PERCENTILE_COLUMNS
        }
        for column in PERCENTILE_COLUMNS:
            if want[column] is None or not from_rollups:
                assert got[column] == want[column]
            else:
                assert_within_one_bucket(got[column], want[column])
    assert fast["unpriced"] == exact["unpriced"]


HOUR = 3600
ALIGNED = (
    "--since",
    str(math.floor(NOW / HOUR) * HOUR - 40 * HOUR),
    "--until",
    str(math.floor(NOW / HOUR) * HOUR - 2 * HOUR),
)


@pytest.mark.parametrize("dimension", [*DIMENSIONS, "label:team"])
@pytest.mark.parametrize("window", [(), ("--since", "30h"), ("--since", "50h", "--until", "3h")])
def test_report_from_rollups_equals_the_row_scan(rolled_db, dimension, window):
    window = tuple(_iso(v) if v.replace(".", "").isdigit() else v for v in window)
    args = ("--db", str(rolled_db), "--by", dimension, "--by", "provider", *window)
    fast = json.loads(invoke(*args, "--format", "json"))
    exact = json.loads(invoke(*args, "--format", "json", "--exact"))
    assert "rollups" in fast["source"] and exact["source"] == "rows"
    assert ("partial" in fast["source"]) == bool(window)
    # whole days from the daily rollups (the open window and the 47 hours hold some), never when grouping by hour
    if dimension == "hour":
        assert "daily" not in fast["source"]
    elif window != ("--since", "30h"):  # 30 hours back from now hold a whole day or not, by the time of day
        assert "daily" in fast["source"]
    assert_same_report(fast, exact)
    fast_csv = list(csv.reader(io.StringIO(invoke(*args, "--format", "csv"))))
    exact_csv = list(csv.reader(io.StringIO(invoke(*args, "--format", "csv", "--exact"))))
    keep = [i for i, name in enumerate(exact_csv[0]) if name not in PERCENTILE_COLUMNS]
    assert [[line[i] for i in keep] for line in fast_csv] == [[line[i] for i in keep] for line in exact_csv]
    table = invoke(*args)
    assert f"(from {fast['source']})" in table and "TOTAL" in table


def _iso(value: str) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(float(value), UTC).isoformat()


def test_hour_aligned_range_reads_only_rollups(rolled_db):
    window = tuple(_iso(v) if v[0].isdigit() else v for v in ALIGNED)
    fast = json.loads(invoke("--db", str(rolled_db), "--by", "hour", *window, "--format", "json"))
    exact = json.loads(invoke("--db", str(rolled_db), "--by", "hour", *window, "--format", "json", "--exact"))
    assert fast["source"] == "hourly rollups" and len(fast["rows"]) > 10
    assert_same_report(fast, exact)


def test_a_label_rolled_up_hourly_only_reads_the_hourly_rollups(tmp_path):
    path = tmp_path / "llmtap.db"
    sink = AuditSink(Settings(db=str(path), metric_labels=("team",)), Health())
    for record in traffic(60, seed=5):
        sink.emit(record)
    sink.close()
    conn = sqlite3.connect(path)  # as after the upgrade that added daily rollups (it knows no allow-list)
    number = MIGRATIONS.index(next(m for m in MIGRATIONS if m.__name__ == "_create_daily_rollups")) + 1
    conn.execute("DROP TABLE rollups_daily")
    conn.execute("DROP TABLE rollup_watermarks")
    conn.execute("DROP TABLE rolled_up")
    conn.execute(f"PRAGMA user_version = {number - 1}")
    conn.commit()
    conn.close()
    AuditStore(str(path), fsync_batch=False, capture_content=False).close()  # migrates: daily, no labels
    args = ("--db", str(path), "--by", "label:team", "--format", "json")
    fast, exact = json.loads(invoke(*args)), json.loads(invoke(*args, "--exact"))
    assert fast["source"] == "hourly rollups"
    assert_same_report(fast, exact)
    # the days before the watermark from the daily rollups, the latest day (not folded yet) from the hourly
    by_model = json.loads(invoke("--db", str(path), "--by", "model", "--format", "json"))
    assert by_model["source"] == "daily and hourly rollups"


def test_a_label_not_rolled_up_and_reprice_read_rows(tmp_path):
    sink = AuditSink(Settings(db=str(tmp_path / "llmtap.db")), Health())  # no metric_labels
    for record in traffic(20, seed=2):
        sink.emit(record)
    sink.close()
    out = json.loads(invoke("--db", str(tmp_path / "llmtap.db"), "--by", "label:team", "--format", "json"))
    assert out["source"].startswith("rows (the label")
    out = json.loads(invoke("--db", str(tmp_path / "llmtap.db"), "--reprice", "--format", "json"))
    assert out["source"] == "rows (--reprice prices each row)"


def test_report_from_rollups_on_postgres_equals_the_row_scan(rolled_db, pg_url):
    from llmtap.audit import postgres

    postgres.import_sqlite(str(rolled_db), pg_url)
    conn = postgres.connect(pg_url)
    assert_rollups_equal_rows(conn, postgres=True, labelled=False)  # imported: rolled up without labels
    conn.close()
    for by in (("model", "instance"), ("day", "status"), ("label:team", "key"), ("hour", "schema", "family")):
        for window in ((), ("--since", "30h")):
            args = ["--db", pg_url, *(a for d in by for a in ("--by", d)), *window, "--format", "json"]
            fast, exact = json.loads(invoke(*args)), json.loads(invoke(*args, "--exact"))
            labelled = "label:team" in by  # imported: rolled up without labels, read from rows
            assert fast["source"].startswith("rows (the label") if labelled else "rollups" in fast["source"]
            exact_by_key = {tuple(r[n] for n in by): r for r in exact["rows"]}
            fast_by_key = {tuple(r[n] for n in by): r for r in fast["rows"]}
            assert set(fast_by_key) == set(exact_by_key)
            for key, row in fast_by_key.items():
                assert_same_report(
                    {"by": list(by), "rows": [row], "totals": fast["totals"], "unpriced": fast["unpriced"]},
                    {
                        "by": list(by),
                        "rows": [exact_by_key[key]],
                        "totals": exact["totals"],
                        "unpriced": exact["unpriced"],
                    },
                    from_rollups=not labelled,
                )


# --- upgrades, retention, replays, kill -9 ------------------------------------------------------


def test_the_v1_fixture_is_backfilled_and_its_money_reads_the_same(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "audit")
    db = tmp_path / "audit" / "llmtap.db"
    AuditStore(str(db), fsync_batch=False, capture_content=False).close()  # migrates
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT sum(requests) FROM rollups").fetchone()[0] == 4
    assert conn.execute("SELECT count(*) FROM rollups WHERE cost_decimal_usd IS NOT NULL").fetchone()[0] > 0
    assert_rollups_equal_rows(conn, labelled=False)
    conn.close()
    fast = json.loads(invoke("--db", str(db), "--by", "model", "--format", "json"))
    exact = json.loads(invoke("--db", str(db), "--by", "model", "--format", "json", "--exact"))
    assert fast["source"] == "daily and hourly rollups"  # the latest day is not folded yet
    assert_same_report(fast, exact)


def test_a_schema_before_rollups_upgrades_with_its_rows_rolled_up(tmp_path):
    path = tmp_path / "llmtap.db"
    store = AuditStore(str(path), fsync_batch=False, capture_content=False)
    lines = [
        make_record(i, request_start=HOUR0 + i * 500, cost_nanousd=660_000 + i if i % 2 else None).to_json().encode()
        for i in range(30)
    ]
    store.apply(1, lines, 100)
    number = MIGRATIONS.index(next(m for m in MIGRATIONS if m.__name__ == "_create_rollups")) + 1
    store.conn.execute("DROP TABLE rollups")  # as a database of the release before rollups
    store.conn.execute("DROP TABLE rollups_daily")
    store.conn.execute("DROP TABLE rollup_watermarks")
    store.conn.execute("DROP TABLE rolled_up")
    store.conn.execute(f"PRAGMA user_version = {number - 1}")
    store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'rollups'").fetchone()[0] == 0
    conn.close()
    AuditStore(str(path), fsync_batch=False, capture_content=False).close()  # migrates
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT sum(requests) FROM rollups").fetchone()[0] == 30
    assert_rollups_equal_rows(conn, labelled=False)
    conn.close()


def test_retention_prunes_rows_keeps_rollups_and_exact_says_what_is_gone(tmp_path):
    path = tmp_path / "llmtap.db"
    store = AuditStore(str(path), fsync_batch=False, capture_content=False)
    lines = [
        make_record(i, request_start=HOUR0 + i * 600, response_end=HOUR0 + i * 600 + 1).to_json().encode()
        for i in range(24)
    ]
    store.apply(1, lines, 100)
    before = store.conn.execute(f"SELECT {', '.join(rollups.VALUE_COLUMNS)} FROM rollups ORDER BY key").fetchall()
    assert store.prune(HOUR0 + 3 * 3600, 500) == 18
    assert (
        store.conn.execute(f"SELECT {', '.join(rollups.VALUE_COLUMNS)} FROM rollups ORDER BY key").fetchall() == before
    )
    store.close()
    out = json.loads(invoke("--db", str(path), "--format", "json"))
    assert out["totals"]["requests"] == 24
    exact = json.loads(invoke("--db", str(path), "--format", "json", "--exact"))
    assert exact["totals"]["requests"] == 6 and "deleted by retention" in exact["source"]
    store = AuditStore(str(path), fsync_batch=False, capture_content=False)
    assert store.prune_rollups(HOUR0 + 2 * 3600 + 1) == 2  # the hours that ended before the cutoff
    store.close()


def test_rollup_retention_may_not_be_shorter_than_row_retention():
    Settings(retention_days=30, rollup_retention_days=400)
    Settings.from_values({"retention_days": 30, "rollup_retention_days": 0})
    with pytest.raises(SettingsError, match="rollup_retention_days"):
        Settings.from_values({"retention_days": 30, "rollup_retention_days": 7})
    with pytest.raises(SettingsError, match="rollup_retention_days"):
        Settings.from_values({"retention_days": 0, "rollup_retention_days": 7})


def test_a_postgres_schema_before_rollups_upgrades_with_its_rows_rolled_up(pg_url):
    from llmtap.audit import postgres

    store = postgres.PostgresStore(pg_url, "old", capture_content=False)
    lines = [make_record(i, request_start=HOUR0 + i * 700).to_json().encode() for i in range(40)]
    store.apply(1, lines, 100)
    number = postgres.MIGRATIONS.index(postgres._create_rollups) + 1
    store.conn.execute("DROP TABLE rollups, rollups_daily, rollup_watermarks")  # as the release before rollups
    store.conn.execute("DELETE FROM llmtap_schema WHERE version >= %s", (number,))
    store.close()
    conn = postgres.connect(pg_url)
    assert number in postgres.migrate(conn)
    assert conn.execute("SELECT sum(requests) FROM rollups").fetchone()[0] == 40
    assert_rollups_equal_rows(conn, postgres=True, labelled=False)
    conn.close()
