"""A hostile upstream through the real proxy: shutdown with streams in flight, absurd numbers,
echoed keys, decompression bombs and large bodies (``llmtap.devtools.hostile``)."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from audit_helpers import db_rows
from conftest import start_tap, wait_until

from llmtap.devtools.hostile import HostileUpstream


@pytest.fixture
def hostile() -> Iterator[HostileUpstream]:
    with HostileUpstream() as upstream:
        yield upstream


def rows(db: Path) -> list[dict]:
    return db_rows(db)


BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def test_sigterm_with_30_streams_in_flight_records_30_rows(tmp_path, hostile) -> None:
    """15 streams end within the grace period, 15 outlive it: all 30 are recorded, the late
    ones with what arrived and ``proxy_shutdown``; a request sent while draining is served and
    its connection closed; no traceback."""
    tap = start_tap(tmp_path, hostile.url, "--stop-grace", "3")
    received: dict[int, int] = {}
    errors: list[BaseException] = []

    def stream(i: int, events: int) -> None:
        try:
            with (
                httpx.Client(base_url=tap.base_url, timeout=30) as client,
                client.stream(
                    "POST",
                    "/chat/completions",
                    json=BODY,
                    headers={"x-hostile": "stream", "x-hostile-events": str(events), "x-hostile-delay": "0.1"},
                ) as response,
            ):
                for chunk in response.iter_raw():
                    received[i] = received.get(i, 0) + len(chunk)
        except httpx.HTTPError:
            pass  # the long streams are cut at shutdown
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i, 10 if i < 15 else 400)) for i in range(30)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(received) == 30, timeout=30)
        tap.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with httpx.Client(base_url=tap.base_url, timeout=10) as client:  # still served while draining
            late = client.post("/chat/completions", json={**BODY, "stream": False})
        assert late.status_code == 200 and late.headers.get("connection") == "close"
        tap.proc.wait(60)
    finally:
        tap.kill()
        for thread in threads:
            thread.join(30)
    assert not errors
    recorded = rows(tap.db)
    streams = [r for r in recorded if r["stream"]]
    assert len(streams) == 30 and len(recorded) == 31
    finished = [r for r in streams if r["error_type"] is None]
    cut = [r for r in streams if r["error_type"] == "proxy_shutdown"]
    assert len(finished) == 15 and len(cut) == 15
    assert all(r["output_tokens"] == 10 for r in finished)
    assert all(r["chunk_count"] and 0 < r["chunk_count"] < 400 for r in cut)  # what arrived is kept
    log = tap.output()
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]


# --- decompression bombs, large bodies, liveness ------------------------------------------------

BOMB_BYTES = 256 << 20  # decoded: far beyond what llmtap may hold or scan


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


@pytest.fixture(scope="session")
def bombs() -> dict[tuple[str, bool], bytes]:
    """Built once per session, at fast compression levels (what the upstream caches too)."""
    from llmtap.devtools.hostile import bomb

    return {(enc, streamed): bomb(enc, BOMB_BYTES, streamed) for enc in ("gzip", "br", "zstd") for streamed in (0, 1)}


def test_bombs_and_large_bodies_cost_bounded_memory_and_block_no_one(tmp_path, hostile, bombs) -> None:
    """gzip/br/zstd bombs, streamed and not, and an 8 MB embeddings-style body whose usage comes
    last (identity and gzip): every byte reaches the client untouched, each exchange is
    recorded (usage of the large body included), proxy RSS stays bounded, and ordinary requests
    sent meanwhile complete."""
    from llmtap.devtools.hostile import big_body, encode

    tap = start_tap(tmp_path, hostile.url, "--parse-scan-bytes", str(32 << 20))
    baseline = rss_mb(tap.proc.pid)
    cases = [
        {"x-hostile": "bomb", "x-hostile-encoding": enc, "x-hostile-stream": str(streamed)} for enc, streamed in bombs
    ] + [{"x-hostile": "big", "x-hostile-encoding": enc} for enc in ("identity", "gzip")]
    received: dict[int, bytes] = {}
    ordinary: list[float] = []
    stop = threading.Event()

    def hostile_call(i: int, headers: dict[str, str]) -> None:
        with httpx.Client(base_url=tap.base_url, timeout=120) as client:
            body = {**BODY, "stream": headers.get("x-hostile-stream") == "1"}
            with client.stream("POST", "/chat/completions", json=body, headers=headers) as response:
                received[i] = b"".join(response.iter_raw())

    def ordinary_calls() -> None:
        with httpx.Client(base_url=tap.base_url, timeout=60) as client:
            while not stop.is_set():
                start = time.monotonic()
                assert client.post("/chat/completions", json={**BODY, "stream": False}).status_code == 200
                ordinary.append(time.monotonic() - start)

    try:
        pinger = threading.Thread(target=ordinary_calls)
        pinger.start()
        threads = [threading.Thread(target=hostile_call, args=(i, h)) for i, h in enumerate(cases)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        stop.set()
        pinger.join(60)
        peak = peak_rss_mb(tap.proc.pid)
        records = tap.wait_records(len(cases) + len(ordinary), timeout=30)
    finally:
        stop.set()
        tap.stop()
    # byte for byte what the upstream sent
    for i, headers in enumerate(cases):
        if headers["x-hostile"] == "bomb":
            assert received[i] == bombs[(headers["x-hostile-encoding"], int(headers["x-hostile-stream"]))]
        else:
            assert received[i] == encode(headers["x-hostile-encoding"], big_body(8 << 20))
    # bounded: the bombs inflate to 256 MB each, six of them at once
    assert peak - baseline < 200, (baseline, peak)
    # liveness (generous: a shared 2-core machine), not a benchmark
    assert ordinary and max(ordinary) < 20, ordinary
    by_kind = {"bomb": [], "big": [], "ok": []}
    for record in records:
        kind = "ok" if record.response_id == "chatcmpl-hostile" else "big" if record.response_id == "emb-1" else "bomb"
        by_kind[kind].append(record)
    assert len(by_kind["bomb"]) == 6 and len(by_kind["big"]) == 2
    assert all(r.parse_problem and "scan bound" in r.parse_problem for r in by_kind["bomb"]), [
        r.parse_problem for r in by_kind["bomb"]
    ]
    assert all(r.http_status == 200 and r.error_type is None for r in by_kind["bomb"])
    for record in by_kind["big"]:
        assert record.input_tokens == record.total_tokens and record.input_tokens > 2000  # usage, read last
        assert record.response_model == "text-embedding-3-small" and record.parse_problem is None


# --- absurd numbers: metrics and audit agree ------------------------------------------------------

ABSURD = [
    {"usage": {"prompt_tokens": -5, "completion_tokens": 3}},
    {"usage": {"prompt_tokens": 10**30, "completion_tokens": 3}},
    {"usage": {"prompt_tokens": 10, "completion_tokens": 10**400}},
    {"usage": {"prompt_tokens": 10, "completion_tokens": 5}, "metadata": {"costs": {"total_tokens": 1e308}}},
    {"usage": {"prompt_tokens": 10, "completion_tokens": 5}, "metadata": {"costs": {"total_tokens": -79683.57}}},
    {
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
        "metadata": {"costs": {"prompt_tokens": 1.7e308, "completion_tokens": 1.7e308}},
    },
    {"usage": {"prompt_tokens": 10, "completion_tokens": 5}, "metadata": {"costs": {"total_tokens": 0.25}}},
    {
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
        "metadata": {"costs": {"total_tokens": 0.5}, "cost_savings": {"total_tokens": -0.1}, "latency": 10**400},
    },
    {"usage": {"prompt_tokens": 1000, "completion_tokens": 500}},
]


def test_absurd_and_negative_numbers_are_never_spend_and_metrics_equal_audit(tmp_path, hostile) -> None:
    tap = start_tap(tmp_path, hostile.url)
    try:
        with httpx.Client(base_url=tap.base_url, timeout=30) as client:
            for spec in ABSURD * 3:
                headers = {"x-hostile": "usage", "x-hostile-usage": json.dumps(spec)}
                assert (
                    client.post("/chat/completions", json={**BODY, "stream": False}, headers=headers).status_code == 200
                )
            # a literal the JSON spec does not have, which Python's parser accepts
            headers = {"x-hostile": "usage", "x-hostile-usage": '{"metadata": {"costs": {"total_tokens": Infinity}}}'}
            client.post("/chat/completions", json={**BODY, "stream": False}, headers=headers)
        records = tap.wait_records(len(ABSURD) * 3 + 1)
        metric_cost = tap.metric("llmtap_cost_usd_total")
        metric_input = tap.metric("llmtap_tokens_total", type="input")
        metric_output = tap.metric("llmtap_tokens_total", type="output")
        anomalies = tap.metric("llmtap_anomalies_total")
    finally:
        tap.stop()
    with sqlite3.connect(tap.db) as conn:
        count, cost, inputs, outputs = conn.execute(
            "SELECT count(*), total(cost_nanousd) / 1e9, total(input_tokens), total(output_tokens) FROM exchanges"
        ).fetchone()
        negatives = conn.execute(
            "SELECT count(*) FROM exchanges WHERE cost_usd < 0 OR input_tokens < 0 OR output_tokens < 0"
        ).fetchone()[0]
        noted = conn.execute("SELECT count(*) FROM exchanges WHERE anomalies IS NOT NULL").fetchone()[0]
    assert count == len(records) == len(ABSURD) * 3 + 1
    assert negatives == 0
    assert cost == pytest.approx(metric_cost, rel=1e-9) and 0 < cost < 10
    assert inputs == metric_input and outputs == metric_output
    assert noted == 6 * 3 + 1 and anomalies >= noted  # the six absurd specs, and Infinity
    for line in tap.jsonl.read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in a JSON line"))
    savings = [r.cost_savings_usd for r in records if r.cost_savings_usd is not None]
    assert savings and all(s == -0.1 for s in savings)  # negative savings stay as reported


# --- a 401 that echoes the key: the key reaches no byte llmtap writes ------------------------------

AUTH_STYLES = {
    "bearer": lambda key: ({"authorization": f"Bearer {key}"}, ""),
    "api-key": lambda key: ({"api-key": key}, ""),
    "x-api-key": lambda key: ({"x-api-key": key}, ""),
    "x-goog-api-key": lambda key: ({"x-goog-api-key": key}, ""),
    "query": lambda key: ({}, f"?key={key}"),
}


def test_a_401_echoing_the_key_leaves_it_in_no_byte_on_disk_spans_or_logs(tmp_path, hostile) -> None:
    from otlp_receiver import OTLPHTTPReceiver

    keys = {style: f"Qx7Lm2Vb9Kp4Ws{i}Tz8Rn3Hd6Jf" for i, style in enumerate(AUTH_STYLES)}
    with OTLPHTTPReceiver() as receiver:
        tap = start_tap(
            tmp_path,
            hostile.url,
            "--capture-content",
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"},
        )
        try:
            with httpx.Client(base_url=tap.base_url, timeout=30) as client:
                for style, make in AUTH_STYLES.items():
                    headers, query = make(keys[style])
                    response = client.post(
                        "/chat/completions" + query,
                        json={"model": "m", "messages": [{"role": "user", "content": f"key {keys[style]}"}]},
                        headers={**headers, "x-hostile": "echo-key"},
                    )
                    assert response.status_code == 401 and keys[style] in response.text  # the app sees it all
            records = tap.wait_records(len(AUTH_STYLES))
            receiver.wait_spans(len(AUTH_STYLES), timeout=30)
            journal = b"".join(p.read_bytes() for p in tmp_path.iterdir() if ".journal." in p.name and p.is_file())
        finally:
            tap.stop()
        spans = receiver.raw_bytes()
    assert all(r.error_type == "http_401" and "[redacted]" in (r.error_message or "") for r in records)
    on_disk = journal + b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    for style, key in keys.items():
        for where, data in (("disk", on_disk), ("spans", spans), ("log", tap.output().encode())):
            assert key.encode() not in data, f"{style} key in {where}"
