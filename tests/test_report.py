"""``llmtap report`` and the Datasette metadata, on a real audit log written by the audit sink."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import random
import sqlite3
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmtap.audit.report import parse_when, report, spend
from llmtap.audit.sqlite import connect_readonly
from llmtap.config import Settings
from llmtap.health import Health
from llmtap.record import ExchangeRecord
from llmtap.sinks.audit import AuditSink

NOW = time.time()
MODELS = ("openai/gpt-4o-mini", "anthropic/claude-3-haiku", "meta/llama-3-8b-instruct")


def traffic(count: int = 90, seed: int = 7) -> list[ExchangeRecord]:
    """Exchanges over the last three days: failures, unknown costs, labels, several apps and keys."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        start = NOW - rng.uniform(0, 3 * 86400)
        status, error = rng.choice(
            [(200, None)] * 6 + [(429, "http_429"), (500, "http_500"), (None, "client_disconnected")]
        )
        model = rng.choice(MODELS)
        known = status == 200 and rng.random() < 0.8
        records.append(
            ExchangeRecord(
                exchange_id=f"r{i}",
                operation="chat",
                method="POST",
                path="/v1/chat/completions",
                request_start=start,
                response_end=start + rng.uniform(0.05, 3.0),
                http_status=status,
                error_type=error,
                request_model="pulze",
                response_model=model if status == 200 else None,
                provider=model.split("/")[0],
                app_id=rng.choice(["app-a", "app-b"]),
                key_fingerprint=rng.choice(["fp_1", "fp_2"]),
                labels=rng.choice([{"team": "search"}, {"team": "ads"}, None]),
                input_tokens=rng.randint(5, 500) if status == 200 else None,
                output_tokens=rng.randint(1, 900) if status == 200 else None,
                cost_usd=rng.uniform(1e-6, 0.02) if known else (0.0 if status and status != 200 else None),
                cost_source="reported" if known else ("computed" if status and status != 200 else "unknown"),
                cost_savings_usd=rng.uniform(0, 0.1) if known else None,
            )
        )
    return records


@pytest.fixture
def audit_db(tmp_path) -> tuple[Path, list[ExchangeRecord]]:
    records = traffic()
    sink = AuditSink(Settings(db=str(tmp_path / "llmtap.db")), Health())
    for record in records:
        sink.emit(record)
    sink.close()
    return tmp_path / "llmtap.db", records


def nearest_rank(values: list[float], p: float) -> float | None:
    values = sorted(values)
    return values[math.ceil(len(values) * p) - 1] if values else None


def expected(records: list[ExchangeRecord], key) -> dict:
    groups = defaultdict(list)
    for r in records:
        groups[key(r)].append(r)
    out = {}
    for name, rs in groups.items():

        def total(field):
            values = [getattr(r, field) for r in rs if getattr(r, field) is not None]
            return sum(values) if values else None

        durations = [r.duration_s for r in rs]
        out[name] = {
            "requests": len(rs),
            "errors": sum(r.error_type is not None for r in rs),
            "input_tokens": total("input_tokens"),
            "output_tokens": total("output_tokens"),
            "cost_usd": total("cost_usd"),
            "cost_savings_usd": total("cost_savings_usd"),
            "unknown_cost": sum(r.cost_usd is None for r in rs),
            "p50_s": nearest_rank(durations, 0.5),
            "p95_s": nearest_rank(durations, 0.95),
        }
    return out


def assert_same(got: dict, want: dict) -> None:
    for metric, value in want.items():
        if isinstance(value, float):
            assert got[metric] == pytest.approx(value, rel=1e-12, abs=1e-15), metric
        else:
            assert got[metric] == value, metric


def invoke(*args: str) -> str:
    result = CliRunner().invoke(report, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_sums_per_model_equal_sums_computed_from_the_records(audit_db):
    db, records = audit_db
    conn = connect_readonly(db)
    rows, totals = spend(conn, ["model"], None, None)
    want = expected(records, lambda r: r.response_model or r.request_model)
    assert {r["model"] for r in rows} == set(want)
    for row in rows:
        assert_same(row, want[row["model"]])
    (all_rows,) = expected(records, lambda r: "all").values()
    assert_same(totals, all_rows)
    assert totals["unknown_cost"] > 0 and totals["cost_usd"] is not None  # unknown is not $0


def test_json_by_two_dimensions_with_a_time_window(audit_db):
    db, records = audit_db
    out = json.loads(
        invoke("--db", str(db), "--since", "24h", "--by", "provider", "--by", "label:team", "--format", "json")
    )
    recent = [r for r in records if r.request_start >= NOW - 86400 - 60]
    assert 0 < len(recent) < len(records)
    want = expected(recent, lambda r: (r.provider, (r.labels or {}).get("team")))
    got = {(row["provider"], row["label:team"]): row for row in out["rows"]}
    assert set(got) == set(want)
    for key, row in got.items():
        assert_same(row, want[key])
    assert out["totals"]["requests"] == len(recent)


def test_iso_window_by_day_and_status(audit_db):
    db, records = audit_db
    today = datetime.fromtimestamp(NOW, UTC).strftime("%Y-%m-%d")
    out = json.loads(invoke("--db", str(db), "--since", today, "--by", "day", "--by", "status", "--format", "json"))
    since = datetime.fromisoformat(today).replace(tzinfo=UTC).timestamp()
    todays = [r for r in records if r.request_start >= since]
    want = expected(todays, lambda r: (today, str(r.http_status) if r.http_status else r.error_type))
    assert {(row["day"], row["status"]): row["requests"] for row in out["rows"]} == {
        k: v["requests"] for k, v in want.items()
    }


def test_csv_has_a_totals_row(audit_db):
    db, records = audit_db
    lines = list(csv.reader(io.StringIO(invoke("--db", str(db), "--by", "app", "--format", "csv"))))
    assert lines[0][:3] == ["app", "requests", "errors"]
    assert [line[0] for line in lines[1:]] == ["app-a", "app-b", "TOTAL"]
    assert int(lines[-1][1]) == len(records)
    assert float(lines[-1][lines[0].index("cost_usd")]) == pytest.approx(
        sum(r.cost_usd for r in records if r.cost_usd is not None)
    )


def test_table_is_readable(audit_db):
    db, records = audit_db
    out = invoke("--db", str(db), "--by", "key")
    for text in ("fp_1", "fp_2", "TOTAL", "requests", "cost USD", "p95", f"{len(records):,}"):
        assert text in out
    assert "…" not in out  # nothing cut off


def test_bad_input_is_a_clear_error(tmp_path, audit_db):
    db, _ = audit_db
    result = CliRunner().invoke(report, ["--db", str(db), "--by", "colour"])
    assert result.exit_code == 2 and "label:NAME" in result.output
    result = CliRunner().invoke(report, ["--db", str(db), "--since", "yesterday"])
    assert result.exit_code == 2 and "duration" in result.output
    missing = tmp_path / "nope.db"
    result = CliRunner().invoke(report, ["--db", str(missing)])
    assert result.exit_code == 1 and "no audit log" in result.output and not missing.exists()


def test_parse_when():
    assert parse_when("90m", 10_000.0) == 10_000.0 - 5400
    assert parse_when("7d", 1e6) == 1e6 - 7 * 86400
    assert parse_when("2024-05-01", 0) == datetime(2024, 5, 1, tzinfo=UTC).timestamp()
    assert parse_when("2024-05-01T10:00:00+02:00", 0) == datetime(2024, 5, 1, 8, tzinfo=UTC).timestamp()


def test_report_reads_while_the_proxy_writes(tmp_path):
    sink = AuditSink(Settings(db=str(tmp_path / "llmtap.db")), Health())
    records = traffic(400, seed=3)
    sink.emit(records[0])
    sink.flush()
    done = threading.Event()

    def write():
        for record in records[1:]:
            sink.emit(record)
            time.sleep(0.0005)
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    counts = []
    while not done.is_set():
        counts.append(json.loads(invoke("--db", str(tmp_path / "llmtap.db"), "--format", "json"))["totals"]["requests"])
    writer.join()
    sink.close()
    assert counts == sorted(counts) and counts[0] >= 1
    assert json.loads(invoke("--db", str(tmp_path / "llmtap.db"), "--format", "json"))["totals"]["requests"] == 400


# --- Datasette ----------------------------------------------------------------------------------


def metadata() -> dict:
    return json.loads(resources.files("llmtap").joinpath("datasette-metadata.json").read_text())


def test_canned_queries_run_on_a_real_log(audit_db):
    db, records = audit_db
    queries = metadata()["databases"]["llmtap"]["queries"]
    assert {"spend_by_day", "top_models", "most_expensive_requests", "errors"} <= set(queries)
    conn = sqlite3.connect(db)
    for _name, query in queries.items():
        params = {p: "" for p in query.get("params", [])}
        conn.execute(query["sql"], params).fetchall()  # raises on a query the schema broke
    by_day = conn.execute(queries["spend_by_day"]["sql"]).fetchall()
    assert sum(row[1] for row in by_day) == len(records)
    errors = conn.execute(queries["errors"]["sql"]).fetchall()
    assert len(errors) == sum(r.error_type is not None for r in records)
    conn.close()


def test_datasette_serves_the_canned_queries(audit_db):
    from datasette.app import Datasette

    db, records = audit_db

    async def fetch():
        ds = Datasette([str(db)], metadata=metadata())
        return [await ds.client.get(f"/llmtap/{name}.json?_shape=array") for name in ("spend_by_day", "top_models")]

    by_day, top = asyncio.run(fetch())
    assert by_day.status_code == 200 and top.status_code == 200
    assert sum(row["requests"] for row in by_day.json()) == len(records)


# --- reads right: labels, partial sums, exact decimals, default grouping, empty ranges ----------


def small_db(tmp_path: Path) -> Path:
    """Three priced exchanges whose float sum is noisy (0.1 + 0.2 + 3.4000000000000003e-06) and
    two of unknown cost, over two models."""
    costs = [("m-a", 0.1), ("m-a", 0.2), ("m-a", 17 * 0.2 / 1e6), ("m-a", None), ("m-b", None)]
    assert sum(c for _, c in costs if c is not None) != 0.3000034  # the noise this test is about
    sink = AuditSink(Settings(db=str(tmp_path / "llmtap.db")), Health())
    for i, (model, cost) in enumerate(costs):
        start = NOW - 60 - i
        sink.emit(
            ExchangeRecord(
                exchange_id=f"s{i}",
                operation="chat",
                method="POST",
                path="/v1/chat/completions",
                request_start=start,
                response_end=start + 0.5,
                http_status=200,
                response_model=model,
                provider="acme",
                cost_usd=cost,
                cost_source="computed" if cost is not None else "unknown",
            )
        )
    sink.close()
    return tmp_path / "llmtap.db"


def test_table_marks_partial_sums_and_labels_the_total(tmp_path):
    out = invoke("--db", str(small_db(tmp_path)))  # no --by: one row per model
    lines = out.splitlines()
    header = next(line for line in lines if "requests" in line)
    assert "model" in header and "unknown_cost" in header and "no cost" not in header
    row_a = next(line for line in lines if "m-a" in line)
    row_b = next(line for line in lines if "m-b" in line)
    total = next(line for line in lines if "TOTAL" in line)
    assert "0.300003 + 1 unknown" in row_a
    assert "1 unknown" in row_b and "+" not in row_b
    assert "0.300003 + 2 unknown" in total and " 5 " in total


def test_no_by_groups_by_model_not_a_copy_of_the_total(tmp_path):
    db = small_db(tmp_path)
    out = json.loads(invoke("--db", str(db), "--format", "json"))
    assert out["by"] == ["model"]
    assert [row["model"] for row in out["rows"]] == ["m-a", "m-b"]
    lines = list(csv.reader(io.StringIO(invoke("--db", str(db), "--format", "csv"))))
    assert [line[0] for line in lines] == ["model", "m-a", "m-b", "TOTAL"]


def test_csv_and_json_print_exact_decimals_and_one_unknown_cost_name(tmp_path):
    db = small_db(tmp_path)
    lines = list(csv.reader(io.StringIO(invoke("--db", str(db), "--format", "csv"))))
    header = lines[0]
    cost = header.index("cost_usd")
    assert "unknown_cost" in header
    assert [line[cost] for line in lines[1:]] == ["0.3000034", "", "0.3000034"]
    assert [line[header.index("unknown_cost")] for line in lines[1:]] == ["1", "1", "2"]
    text = invoke("--db", str(db), "--format", "json")
    assert '"cost_usd": 0.3000034,' in text and "000000" not in text.replace("0.3000034", "")
    out = json.loads(text)
    assert out["totals"]["unknown_cost"] == 2 and out["rows"][1]["cost_usd"] is None


def test_an_empty_range_says_so_in_every_format(tmp_path):
    db = small_db(tmp_path)
    window = ("--since", "2001-01-01", "--until", "2001-01-02")
    table = invoke("--db", str(db), *window)
    assert "No exchanges from 2001-01-01 00:00:00 UTC to 2001-01-02 00:00:00 UTC" in table
    assert "TOTAL" not in table
    result = CliRunner().invoke(report, ["--db", str(db), *window, "--format", "csv"])
    assert result.exit_code == 0 and "no exchanges" in result.stderr
    assert list(csv.reader(io.StringIO(result.stdout)))[1][:2] == ["TOTAL", "0"]
    result = CliRunner().invoke(report, ["--db", str(db), *window, "--format", "json"])
    assert result.exit_code == 0 and "no exchanges" in result.stderr
    assert json.loads(result.stdout)["rows"] == [] and json.loads(result.stdout)["totals"]["requests"] == 0
