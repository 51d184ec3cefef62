"""The audit log end to end: the real proxy (``llmtap run``) driven by the openai SDK, killed and
locked mid-run, its rows compared with what the simulator really answered.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time

import httpx
import openai
import pytest
from audit_helpers import (
    all_bytes,
    db_rows,
    journal_files,
    row_count,
    run_verify,
)
from conftest import API_KEY, start_tap, wait_until
from test_rollups import assert_rollups_equal_rows

from llmtap.audit.rows import metadata_of
from llmtap.config import Settings
from llmtap.health import Health
from llmtap.record import canonical_json
from llmtap.sinks.audit import AuditSink

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
        # the raw metadata comes back whole from the columns and the remainder, which holds far less
        assert metadata_of(row) == final["metadata"]
        remainder = json.loads(row["metadata_json"])
        assert remainder["~"] and "costs" not in remainder and "model" not in remainder
        assert len(row["metadata_json"]) < len(canonical_json(final["metadata"])) / 2
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
    conn = sqlite3.connect(db)
    assert_rollups_equal_rows(conn, labelled=False)  # every batch's rollups committed with its rows
    conn.close()
