"""A hostile upstream through the real proxy: shutdown with streams in flight, absurd numbers,
echoed keys, decompression bombs and large bodies (``llmtap.devtools.hostile``)."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import start_tap, wait_until

from llmtap.devtools.hostile import HostileUpstream


@pytest.fixture
def hostile() -> Iterator[HostileUpstream]:
    with HostileUpstream() as upstream:
        yield upstream


def rows(db: Path, where: str = "1") -> list[dict]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(f"SELECT * FROM exchanges WHERE {where}")]


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
