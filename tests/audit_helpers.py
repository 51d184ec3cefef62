"""Shared helpers of the audit tests: hand-built records, a sink on a temporary log, rows as dicts."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from click.testing import CliRunner

from llmtap.audit.report import audit
from llmtap.audit.sqlite import as_hashed, content_as_hashed
from llmtap.config import Settings
from llmtap.health import Health
from llmtap.record import ExchangeRecord
from llmtap.sinks.audit import AuditSink

NOW = time.time()


def make_record(i: int, **changes) -> ExchangeRecord:
    """A realistic finished exchange; every kind of field filled."""
    record = ExchangeRecord(
        exchange_id=f"ex-{i:05d}",
        operation="chat",
        method="POST",
        path="/v1/chat/completions",
        request_start=NOW - 10 + i * 0.001,
        request_end=NOW - 9.99 + i * 0.001,
        response_start=NOW - 9.5 + i * 0.001,
        first_token_at=NOW - 9.4 + i * 0.001,
        response_end=NOW - 9 + i * 0.001,
        upstream_latency_s=0.601,
        client_address="127.0.0.1",
        upstream_scheme="https",
        upstream_host="api.pulze.ai",
        upstream_port=443,
        router="pulze",
        provider="openai",
        http_status=200,
        stream=bool(i % 2),
        key_fingerprint="fp_0123456789abcdef",
        app_id="app-1",
        labels={"team": "search", "env": "prod"},
        weights={"cost": 0.5, "quality": 0.5},
        policies={"max_cost": 0.01},
        trace_id="a" * 32,
        span_id="b" * 16,
        request_model="pulze",
        max_tokens=64,
        temperature=1,
        top_p=0.9,
        n=1,
        stop=("\n\n",),
        tool_names=("search",),
        tool_count=1,
        logit_bias=True,
        response_id=f"chatcmpl-{i}",
        response_object="chat.completion",
        created_at=1701483003.546,
        response_model="openai/gpt-4o-mini",
        served_model="gpt-4o-mini",
        served_provider="openai",
        served_namespace="openai/gpt-4o-mini",
        input_tokens=10 + i,
        output_tokens=20 + i,
        total_tokens=30 + 2 * i,
        finish_reasons=("stop",),
        choice_count=1,
        cost_usd=0.00066 + i * 1e-6,
        cost_prompt_usd=0.0002,
        cost_completion_usd=0.00046 + i * 1e-6,
        cost_source="reported",
        cost_savings_usd=0.01,
        retries=0,
        upstream_status_code=200,
        score=0.87,
        response_labels={"team": "search"},
        category="general",
        metadata={"costs": {"total_tokens": 0.00066}, "new_pulze_field": [1, {"x": None}]},
    )
    return record.replace(**changes)


def new_sink(tmp_path: Path, health: Health | None = None, **kwargs) -> AuditSink:
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in Settings.__dataclass_fields__}
    options.setdefault("db", str(tmp_path / "llmtap.db"))
    return AuditSink(Settings(**options), health or Health(), **kwargs)


def write_records(tmp_path: Path, count: int) -> None:
    """An audit log holding records 0..count-1, written by a sink that then stopped cleanly."""
    sink = new_sink(tmp_path)
    for i in range(count):
        sink.emit(make_record(i))
    sink.close()


def db_rows(db: Path | str, table: str = "exchanges") -> list[dict]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)  # never create it by accident
    conn.row_factory = sqlite3.Row
    try:
        rows = (dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY rowid"))
        if table == "exchanges":  # the values as hashed: ids as text, prev_hash as implied
            return list(as_hashed(conn, rows))
        return [content_as_hashed(row) if table == "content" else row for row in rows]
    finally:
        conn.close()


def row_count(db: Path) -> int:
    """For polling: 0 until the proxy's writer has created the log."""
    try:
        return len(db_rows(db))
    except sqlite3.OperationalError:
        return 0


def journal_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if ".journal." in p.name and not p.name.endswith(".lock"))


def run_verify(db: Path | str):
    return CliRunner().invoke(audit, ["verify", "--db", str(db)])


def all_bytes(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
