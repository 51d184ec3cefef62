"""Central audit store bench: how fast one writer applies a journal backlog to PostgreSQL
(and, beside it, to SQLite), in the writer's own batches.

Starts a throwaway PostgreSQL cluster (as the tests do: Debian's binaries, the ``postgres``
user, a free loopback port), writes ``--rows`` typical journal lines (the audit bench's
record template, each with its own ids and times), then times ``store.apply`` over the journal
read in the writer's batches (``read_lines``, 4 MiB each): parse, row building, chain hashing,
the duplicate check, COPY and the offset, one transaction per batch. The default is a one-hour
backlog at 100 requests/s (360,000 rows). Prints one JSON line per store, with the bytes each
exchange takes on disk (rows and indexes) and PostgreSQL's verify rate.

    .venv/bin/python bench/postgres_store.py [--rows 360000]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from audit_writer import TEMPLATE
from pg import PASSWORD, Cluster

from llmtap.audit import postgres
from llmtap.audit.journal import read_lines
from llmtap.audit.sqlite import AuditStore


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_journal(path: Path, rows: int) -> int:
    start = time.time() - 3600
    with path.open("wb") as f:
        for i in range(rows):
            t = start + i * 0.01
            record = TEMPLATE.replace(
                exchange_id=str(uuid.uuid4()),
                request_start=t,
                request_end=t + 0.0002,
                response_start=t + 0.004,
                response_end=t + 0.0045,
                response_id=f"chatcmpl-{i}",
                instance="bench",
            )
            f.write((record.to_json() + "\n").encode())
    return path.stat().st_size


def backend_cpu(pid: int | None) -> float:
    """CPU seconds the server process serving this writer has used (utime + stime)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drain(store, path: Path) -> tuple[int, float, int]:
    offset, rows, batches = 0, 0, 0
    started = time.perf_counter()
    while True:
        lines, end = read_lines(str(path), offset)
        if end == offset:
            break
        batch = store.apply(1, lines, end)
        assert not batch.rejected and not batch.corrupt, (batch.rejected[:1], batch.corrupt[:1])
        rows += len(batch.records)
        offset, batches = end, batches + 1
    return rows, time.perf_counter() - started, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=360_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmtap-bench-pg-"))
    journal = work / "llmtap.journal.1"
    size = write_journal(journal, args.rows)
    os.environ["PGPASSWORD"] = PASSWORD
    cluster = Cluster(free_port())
    try:
        cluster.start()  # fsync=off as in the tests: the bench measures llmtap, not the disk
        url = cluster.create_database("bench")
        store = postgres.PostgresStore(url, "bench-instance", capture_content=False)
        backend = store.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        cpu, server = time.process_time(), backend_cpu(backend)
        rows, seconds, batches = drain(store, journal)
        cpu, server = time.process_time() - cpu, backend_cpu(backend) - server
        started = time.perf_counter()
        verified = postgres.verify(store.conn)
        verify_seconds = time.perf_counter() - started
        store.conn.execute("VACUUM ANALYZE exchanges")
        size, rolled = store.conn.execute(
            "SELECT pg_total_relation_size('exchanges'), coalesce(pg_total_relation_size(to_regclass('rollups')), 0)"
        ).fetchone()
        store.close()
        print(
            json.dumps(
                {
                    "store": "postgresql",
                    "rows": rows,
                    "journal_mb": round(size / 2**20, 1),
                    "batches": batches,
                    "seconds": round(seconds, 2),
                    "rows_per_s": round(rows / seconds),
                    "writer_cpu_us_per_row": round(cpu / rows * 1e6, 1),
                    "server_cpu_us_per_row": round(server / rows * 1e6, 1),
                    # the two run in parallel (COPY streams): the rate with a core each, unshared
                    "rows_per_cpu_s": round(rows / max(cpu, server)),
                    "chain_ok": all(v.check.ok for v in verified),
                    "verify_rows_per_s": round(rows / verify_seconds),
                    # the table, its TOAST and its indexes, per exchange
                    "bytes_per_row": round(size / rows),
                    "rollups_bytes_per_row": round(rolled / rows, 2),
                }
            )
        )
    finally:
        cluster.remove()
    lite = AuditStore(str(work / "bench.db"), fsync_batch=False, capture_content=False)
    cpu = time.process_time()
    rows, seconds, batches = drain(lite, journal)
    cpu = time.process_time() - cpu
    lite.close()
    with sqlite3.connect(work / "bench.db") as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = conn.execute("SELECT sum(pgsize) FROM dbstat").fetchone()[0]  # rows, indexes, free pages
    print(
        json.dumps(
            {
                "store": "sqlite",
                "rows": rows,
                "batches": batches,
                "seconds": round(seconds, 2),
                "rows_per_s": round(rows / seconds),
                "rows_per_cpu_s": round(rows / cpu),
                "bytes_per_row": round(size / rows),
            }
        )
    )
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
