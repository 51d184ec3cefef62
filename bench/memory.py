"""Proxy memory over many mixed exchanges: plain, streamed, and failing in five ways.

RSS is read after a warm-up (imports, caches, connection pools and SQLite's page cache fill
up in the first few thousand exchanges), then after the run once the audit log has caught up.
Growth between the two is what would keep growing in production.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from load import CHAT_PATH, mix_script, wrk
from procs import PeakSampler, Proc


@dataclass(frozen=True)
class MemoryResult:
    exchanges: int  # responses the load generator got (a stream cut short has none)
    recorded: int  # rows in the audit log after the run
    seconds: float
    rss_start_mb: float
    rss_before_mb: float  # after the warm-up
    rss_peak_mb: float
    rss_after_mb: float
    writer_rss_before_mb: float  # llmtap's audit writer process, after the warm-up
    writer_rss_after_mb: float

    @property
    def growth_mb(self) -> float:
        """Of the proxy and its writer process together."""
        return self.rss_after_mb - self.rss_before_mb + self.writer_rss_after_mb - self.writer_rss_before_mb


def audit_rows(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return conn.execute("select count(*) from exchanges").fetchone()[0]


def settle(proxy: Proc, timeout: float = 120.0) -> int:
    """Wait until the audit log stops growing (the writer caught up); return its row count."""
    deadline, last = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        time.sleep(1.0)
        rows = audit_rows(proxy.extra["db"])
        if rows == last:
            return rows
        last = rows
    return last


def run(proxy: Proc, workdir: Path, exchanges: int, warmup: int, connections: int = 16) -> MemoryResult:
    url = proxy.url + CHAT_PATH
    rss_start = proxy.rss_mb()
    wrk(url, mix_script(warmup), workdir, connections=connections, seconds=warmup / 50 + 60)
    recorded_before = settle(proxy)
    rss_before, writer_before = proxy.rss_mb(), proxy.writer_rss_mb()
    with PeakSampler(proxy.rss_mb, 0.5) as peak:
        started = time.monotonic()
        result = wrk(url, mix_script(exchanges), workdir, connections=connections, seconds=exchanges / 50 + 60)
        seconds = time.monotonic() - started
        recorded = settle(proxy) - recorded_before
    return MemoryResult(
        result.requests,
        recorded,
        seconds,
        rss_start,
        rss_before,
        peak.peak,
        proxy.rss_mb(),
        writer_before,
        proxy.writer_rss_mb(),
    )
