"""The audit log at scale: a month of traffic in one SQLite file, and what reading it costs.

1. Templates: real records. The simulator serves the demo's mixed traffic (every protocol
   family, Pulze with its raw ``metadata``, streams, faults) through a real ``llmtap run``;
   its ``--jsonl`` lines are the journal lines the writer would read.
2. A month: ``--rows`` records made from those templates, each with its own exchange,
   trace, span and response ids, spread evenly over ``--days`` days ending at the last whole
   hour, with 40 API keys and 12 apps, applied to a new audit log by the writer's own
   ``AuditStore.apply`` in its batch size (parse, rows, chain, the rollups where the code has
   them, one transaction per batch). The time in ``apply`` alone gives the writer's rows/s
   (making the lines, which a writer does not do, is counted apart).
3. Bytes per exchange: the file (after a WAL checkpoint) over the rows, and per table and
   index (``dbstat``).
4. ``llmtap report`` (the real CLI, a new process each time) over the whole hour-aligned
   range, for each grouping, median of ``--runs``; ``--since 7d`` (not aligned); and with
   ``--exact`` when the code has it (``--exact-groupings``, slow by design).
5. ``llmtap audit verify``: wall time and peak RSS.

    .venv/bin/python bench/scale.py --rows 10000000 --db /tmp/scale.db [--keep]

Prints a JSON document at the end (and progress on stderr).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import start_tap  # noqa: E402

from llmtap.audit.sqlite import AuditStore  # noqa: E402
from llmtap.devtools import traffic  # noqa: E402
from llmtap.devtools.simulator import Simulator  # noqa: E402

LLMTAP = str(Path(sys.executable).with_name("llmtap"))
GROUPINGS = (
    ("model",),
    ("provider",),
    ("app",),
    ("key",),
    ("status",),
    ("instance",),
    ("family",),
    ("day",),
    ("hour",),
    ("day", "provider"),
    ("label:team",),
)
BATCH_BYTES = 4 << 20  # the writer's read_lines batch


def templates(workdir: Path, count: int) -> list[dict]:
    """``count`` records of the demo's traffic, as the proxy journaled them."""
    simulator = Simulator(host="127.0.0.1", port=0, chunk_delay=0.0)
    simulator.start()
    tap = start_tap(workdir, simulator.url)
    try:
        traffic.drive(f"http://127.0.0.1:{tap.port}/v1", api_key="sk-bench-scale", count=count)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lines = tap.jsonl.read_bytes().splitlines() if tap.jsonl.exists() else []
            if len(lines) >= count:
                break
            time.sleep(0.2)
    finally:
        tap.stop()
        simulator.stop()
    return [json.loads(line) for line in lines]


def month(samples: list[dict], rows: int, end: float, days: float, seed: int = 7):
    """``rows`` journal lines from ``samples``, evenly spread over the ``days`` before ``end``.

    40 API keys, each belonging to one of 12 apps, as in a real deployment; each sample (a
    model, a family, an outcome) is sent by 3 of the keys, so that keys and models mix.
    """
    rng = random.Random(seed)
    keys = [f"fp-{rng.getrandbits(64):016x}" for _ in range(40)]
    apps = [f"app-{rng.getrandbits(32):08x}" for _ in range(12)]
    app_of = {key: apps[i % len(apps)] for i, key in enumerate(keys)}
    senders = [rng.sample(keys, 3) for _ in samples]
    step = days * 86400 / rows
    start = end - days * 86400
    for i in range(rows):
        j = i % len(samples)
        record = dict(samples[j])
        t0 = record["request_start"]
        t = start + i * step
        for name, value in record.items():
            if name.endswith(("_start", "_end", "_at")) and isinstance(value, float) and name != "created_at":
                record[name] = t + (value - t0)
        record["exchange_id"] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        record["trace_id"] = f"{rng.getrandbits(128):032x}"
        record["span_id"] = f"{rng.getrandbits(64):016x}"
        if record.get("response_id"):
            record["response_id"] = f"{record['response_id'][:12]}{i:x}"
        key = senders[j][rng.randrange(3)]
        record["key_fingerprint"] = key
        if record.get("app_id"):
            record["app_id"] = app_of[key]
            if isinstance(record.get("metadata"), dict):  # where the router reported it
                record["metadata"] = {**record["metadata"], "app_id": record["app_id"]}
        yield (json.dumps(record, separators=(",", ":")) + "\n").encode()


def fill(db: Path, lines, rows: int) -> dict:
    """Apply ``lines`` in the writer's batches; the writer's rows/s."""
    labels = {"rollup_labels": ("team",)} if "rollup_labels" in inspect.signature(AuditStore).parameters else {}
    store = AuditStore(str(db), fsync_batch=False, capture_content=False, **labels)  # as --metric-labels team
    result = apply_all(store, lines, rows)
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return result


def fill_postgres(lines, rows: int) -> dict:
    """The same rows in a throwaway PostgreSQL cluster (as the tests start one): the writer's
    rows/s, and the bytes per exchange of the tables with their TOAST and indexes."""
    from pg import PASSWORD, Cluster

    from llmtap.audit import postgres

    os.environ["PGPASSWORD"] = PASSWORD
    cluster = Cluster(free_port())
    try:
        cluster.start()
        store = postgres.PostgresStore(
            cluster.create_database("scale"), "scale", capture_content=False, rollup_labels=("team",)
        )
        result = apply_all(store, lines, rows)
        tables = [name for (name,) in store.conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        # as written (the rollups' updated rows leave dead versions that autovacuum makes reusable),
        # then compacted (VACUUM FULL): what the live rows take
        for state, vacuum in (("as_written", "VACUUM ANALYZE"), ("compacted", "VACUUM FULL")):
            store.conn.execute(vacuum)
            sql = "SELECT pg_total_relation_size(%s)"
            parts = {name: store.conn.execute(sql, (name,)).fetchone()[0] for name in tables}
            result[state] = {
                "bytes_per_exchange": round(sum(parts.values()) / rows, 1),
                "per_exchange_by_table": {name: round(n / rows, 1) for name, n in parts.items() if n > 16384},
            }
        store.close()
    finally:
        cluster.stop()
    return result


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apply_all(store, lines, rows: int) -> dict:
    """Apply ``lines`` in the writer's 4 MiB batches. The writer's figures count only the time
    in ``store.apply`` (what the writer process does with journal lines); making the lines,
    which the bench does and a writer does not, is counted apart."""
    batch, size, offset, done = [], 0, 0, 0
    began = last = time.perf_counter()
    writer_wall = writer_cpu = 0.0

    # a backlog: more lines wait behind every batch but the last (an llmtap before ``more`` has no such flag)
    backlog = {"more": True} if "more" in inspect.signature(store.apply).parameters else {}

    def apply(batch: list[bytes], end: int, last: bool = False) -> None:
        nonlocal writer_wall, writer_cpu
        wall, cpu = time.perf_counter(), time.process_time()
        store.apply(1, batch, end, **({} if last else backlog))
        writer_wall += time.perf_counter() - wall
        writer_cpu += time.process_time() - cpu

    for line in lines:
        batch.append(line)
        size += len(line)
        if size >= BATCH_BYTES:
            offset += size
            apply(batch, offset)
            done += len(batch)
            batch, size = [], 0
            if time.perf_counter() - last > 30:
                last = time.perf_counter()
                print(f"  {done:,} / {rows:,} rows, {done / (last - began):,.0f} rows/s", file=sys.stderr)
    if batch:
        apply(batch, offset + size, last=True)
        done += len(batch)
    elif backlog:
        apply([], offset, last=True)  # nothing behind it: what is held is rolled up
    return {
        "rows": done,
        "seconds": round(writer_wall, 1),
        "rows_per_s": round(done / writer_wall),
        "cpu_us_per_row": round(writer_cpu / done * 1e6, 1),
        "with_making_the_lines_s": round(time.perf_counter() - began, 1),
    }


def sizes(db: Path) -> dict:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT count(*) FROM exchanges").fetchone()[0]
    try:
        parts = dict(conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC"))
    except sqlite3.OperationalError:  # an SQLite built without dbstat
        parts = {}
    conn.close()
    total = db.stat().st_size
    return {
        "file_bytes": total,
        "bytes_per_exchange": round(total / rows, 1),
        "per_exchange_by_object": {name: round(size / rows, 1) for name, size in parts.items()},
    }


def timed(args: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB) and stdout of one CLI run."""
    began = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([LLMTAP, *args], stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - began
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"{args}: exit {proc.returncode}: {err.read()[-2000:].decode(errors='replace')}")
        return wall, usage.ru_maxrss, out.read().decode()


def reports(db: Path, since: str, until: str, runs: int, exact: list[tuple[str, ...]], has_exact: bool) -> dict:
    found = {}
    for by in GROUPINGS:
        args = ["report", "--db", str(db), "--since", since, "--until", until, "--format", "json"]
        args += [part for name in by for part in ("--by", name)]
        walls = []
        for _ in range(runs):
            wall, _, out = timed(args)
            walls.append(wall)
        document = json.loads(out)
        found[",".join(by)] = {
            "median_s": round(statistics.median(walls), 3),
            "runs": [round(w, 3) for w in walls],
            "groups": len(document["rows"]),
            "source": document.get("source", "rows"),
            "total_nanousd": document["totals"].get("cost_nanousd"),
        }
        print(f"  report --by {','.join(by)}: {found[','.join(by)]}", file=sys.stderr)
    walls = [timed(["report", "--db", str(db), "--since", "7d", "--format", "json"])[0] for _ in range(runs)]
    found["model (--since 7d)"] = {"median_s": round(statistics.median(walls), 3)}
    if has_exact:
        for by in exact:
            args = ["report", "--db", str(db), "--since", since, "--until", until, "--format", "json", "--exact"]
            args += [part for name in by for part in ("--by", name)]
            wall, _, out = timed(args)
            document = json.loads(out)
            key = ",".join(by)
            found[f"{key} --exact"] = {
                "seconds": round(wall, 1),
                "total_nanousd": document["totals"].get("cost_nanousd"),
                "same_total": document["totals"].get("cost_nanousd") == found[key]["total_nanousd"],
            }
            print(f"  report --exact --by {key}: {found[f'{key} --exact']}", file=sys.stderr)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--db", type=Path, default=None, help="where the audit log goes (default: a temp dir)")
    parser.add_argument("--templates", type=int, default=400, help="real records to make the month from")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--exact-groupings", default="model", help="comma-separated groupings also run with --exact")
    parser.add_argument("--reuse", action="store_true", help="measure an existing --db instead of filling it")
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--fill-only", action="store_true", help="fill --db and measure its size, nothing else")
    parser.add_argument("--postgres", action="store_true", help="also fill a throwaway PostgreSQL with the same rows")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="llmtap-scale-"))
    db = args.db or workdir / "scale.db"
    end = (time.time() // 3600) * 3600  # the last whole hour
    result: dict = {"rows": args.rows, "days": args.days}
    if not args.reuse:
        if db.exists():
            raise SystemExit(f"{db} exists: remove it or pass --reuse")
        samples = templates(workdir, args.templates)
        print(f"{len(samples)} template records; filling {args.rows:,} rows", file=sys.stderr)
        result["writer"] = fill(db, month(samples, args.rows, end, args.days), args.rows)
        print(f"  writer: {result['writer']}", file=sys.stderr)
        if args.postgres:
            result["postgres"] = fill_postgres(month(samples, args.rows, end, args.days), args.rows)
            print(f"  postgres: {result['postgres']}", file=sys.stderr)
    else:
        conn = sqlite3.connect(db)
        end = (conn.execute("SELECT max(request_start) FROM exchanges").fetchone()[0] // 3600 + 1) * 3600
        conn.close()
    result["size"] = sizes(db)
    print(f"  size: {result['size']}", file=sys.stderr)
    if args.fill_only:
        print(json.dumps(result, indent=2))
        return
    since = time.strftime("%Y-%m-%dT%H:00:00", time.gmtime(end - args.days * 86400))
    until = time.strftime("%Y-%m-%dT%H:00:00", time.gmtime(end))
    has_exact = "--exact" in subprocess.run([LLMTAP, "report", "--help"], capture_output=True, text=True).stdout
    exact = [tuple(g.split("+")) for g in args.exact_groupings.split(",") if g]
    result["report"] = reports(db, since, until, args.runs, exact, has_exact)
    if not args.skip_verify:
        wall, peak, out = timed(["audit", "verify", "--db", str(db)])
        result["verify"] = {"seconds": round(wall, 1), "peak_rss_mib": round(peak / 1024, 1), "output": out.strip()}
        print(f"  verify: {result['verify']}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    if args.db is None:
        for path in workdir.glob("scale.db*"):
            os.unlink(path)


if __name__ == "__main__":
    main()
