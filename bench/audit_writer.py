"""Audit writer bench: ``AuditSink`` driven directly with records, in a process of its own.

Run by ``run.py`` pinned to the proxy's core, as the sink's emit runs in the proxy; the sink's
writer process is moved to the other core, as in the throughput bench. Prints one JSON line.
Two measurements:

- burst: emit N records as fast as possible, then ``flush()``: rows/s into SQLite over the
  whole time, the emit cost per record, and the peak queue depth;
- paced: offer ``--rate`` rows/s for ``--seconds`` seconds: does the writer keep up (queue
  depth stays low and drains right after)?
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path

from procs import LOAD_CPU, PeakSampler, cpu_seconds, pin_writer

from llmtap.config import Settings
from llmtap.health import Health
from llmtap.record import ExchangeRecord

#: What a typical Pulze chat completion turns into (metadata as the simulator sends it).
TEMPLATE = ExchangeRecord(
    exchange_id="template",
    operation="chat",
    method="POST",
    path="/v1/chat/completions",
    request_start=1.7e9,
    request_end=1.7e9 + 0.0002,
    response_start=1.7e9 + 0.004,
    response_end=1.7e9 + 0.0045,
    upstream_latency_s=0.601,
    client_address="127.0.0.1",
    upstream_scheme="https",
    upstream_host="api.pulze.ai",
    upstream_port=443,
    router="pulze",
    provider="openai",
    http_status=200,
    key_fingerprint="fp_0123456789abcdef",
    app_id="app-2d711642",
    labels={"team": "search"},
    trace_id="0af7651916cd43dd8448eb211c80319c",
    span_id="b7ad6b7169203331",
    request_model="pulze",
    max_tokens=64,
    temperature=0.2,
    response_id="chatcmpl-1",
    response_object="chat.completion",
    created_at=1701483003.546,
    response_model="openai/gpt-4o-mini",
    served_model="gpt-4o-mini",
    served_provider="openai",
    served_owner="openai",
    served_namespace="openai/gpt-4o-mini",
    served_at="2024-06-01",
    input_tokens=18,
    output_tokens=30,
    total_tokens=48,
    finish_reasons=("stop",),
    choice_count=1,
    cost_usd=0.0000207,
    cost_prompt_usd=0.0000027,
    cost_completion_usd=0.000018,
    cost_source="reported",
    cost_savings_usd=0.002319,  # as the Pulze overlay reads them from the metadata below
    cost_savings_prompt_usd=0.000537,
    cost_savings_completion_usd=0.001782,
    retries=0,
    upstream_status_code=200,
    score=0.7804,
    best_model="openai/gpt-4o-mini",
    candidate_count=5,
    response_labels={"team": "search"},
    category="question-answering",
    metadata={
        "app_id": "app-2d711642",
        "model": {
            "model": "gpt-4o-mini",
            "provider": "openai",
            "owner": "openai",
            "namespace": "openai/gpt-4o-mini",
            "at": "2024-06-01",
        },
        "costs": {"prompt_tokens": 2.7e-06, "completion_tokens": 1.8e-05, "total_tokens": 2.07e-05},
        "cost_savings": {"prompt_tokens": 0.000537, "completion_tokens": 0.001782, "total_tokens": 0.002319},
        "latency": 0.601,
        "labels": {"team": "search"},
        "score": 0.7804,
        "scores": {
            "best_models": [{"openai/gpt-4o-mini": 0.7804}],
            "candidates": [
                {"openai/gpt-4o-mini": 0.7804},
                {"meta/llama-3-8b-instruct": 0.6961},
                {"mistralai/mistral-small": 0.6373},
                {"openai/gpt-4o": 0.6314},
                {"anthropic/claude-3-haiku": 0.6314},
            ],
        },
        "status_code": 200,
        "retries": 0,
        "warning": None,
        "error": None,
        "temperature": 0.2,
        "max_tokens": 64,
        "category": "question-answering",
        "extra": {},
    },
)


def records(prefix: str, count: int) -> list[ExchangeRecord]:
    return [
        TEMPLATE.replace(exchange_id=f"{prefix}-{i}", request_start=TEMPLATE.request_start + i) for i in range(count)
    ]


def burst(sink, gauge, count: int) -> dict:
    batch = records("burst", count)
    with PeakSampler(gauge, 0.001) as depth:
        started = time.perf_counter()
        for record in batch:
            sink.emit(record)
        emitted = time.perf_counter()
        depth.peak = max(depth.peak, gauge())
        sink.flush(timeout=300)
        done = time.perf_counter()
    return {
        "records": count,
        "rows_per_s": count / (done - started),
        "emit_us": (emitted - started) / count * 1e6,
        "peak_queue_depth": depth.peak,
        "left_after_flush": gauge(),
    }


def paced(sink, gauge, rate: int, seconds: float) -> dict:
    """Emit ``rate`` records per second in 10 ms slices; how deep does the queue get?"""
    per_slice = max(1, rate // 100)
    slices = int(seconds * 100)
    batch = records("paced", per_slice * slices)
    with PeakSampler(gauge, 0.001) as depth:
        started = time.perf_counter()
        for i in range(slices):
            for record in batch[i * per_slice : (i + 1) * per_slice]:
                sink.emit(record)
            pause = started + (i + 1) * 0.01 - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        offered_for = time.perf_counter() - started
        sink.flush(timeout=300)
        drained = time.perf_counter() - started - offered_for
    return {
        "offered_rows_per_s": len(batch) / offered_for,
        "peak_queue_depth": depth.peak,
        "drain_after_ms": drained * 1e3,
        "left_after_flush": gauge(),
    }


def run(workdir: Path, count: int, rate: int, seconds: float) -> dict:
    from llmtap.sinks.audit import AuditSink

    db = workdir / "audit-writer.db"
    health = Health()
    sink = AuditSink(Settings(db=str(db)), health)
    writer_pid = pin_writer(os.getpid(), LOAD_CPU)
    gauge = health.gauges["audit_queue_depth"]
    try:
        result = {"burst": burst(sink, gauge, count), "paced": paced(sink, gauge, rate, seconds)}
        result["writer_cpu_s"] = cpu_seconds(writer_pid)
    finally:
        sink.close()
    with sqlite3.connect(db) as conn:
        result["rows_in_db"] = conn.execute("select count(*) from exchanges").fetchone()[0]
    result["expected_rows"] = count + int(seconds * 100) * max(1, rate // 100)
    result["dropped"] = health.audit_dropped
    result["internal_errors"] = dict(health.internal_errors)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=20_000, help="rows/s offered in the paced run")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmtap-audit-bench-") as tmp:
        print(json.dumps(run(args.workdir or Path(tmp), args.records, args.rate, args.seconds)))


if __name__ == "__main__":
    main()
