"""Soak: mixed traffic, hostile cases included, for a bounded time; then rows, sums and resources.

    .venv/bin/python bench/soak.py --seconds 600 [--workers 8]

Traffic through ``llmtap run`` (audit log and metrics on) to the hostile upstream
(``llmtap.devtools.hostile``): ordinary completions, streams, absurd and negative usage and
costs, 401s echoing the key, decompression bombs (gzip, br, zstd; streamed and not), 8 MB
embeddings-style bodies, and clients that hang up mid-stream. Every few seconds the proxy's and
its audit writer's RSS and open file descriptors are sampled. At the end (after a graceful
stop): audit rows == requests sent, ``llmtap_cost_usd_total`` == the audit log's sum of
``cost_nanousd`` (the exact amounts the counter adds), no key in the DB, and the resource samples (first, peak, last).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs

KEY = "Vq3Nx8Kd2Lm7Pz4Rt9Wb6Hc"  # no known key format: only llmtap's exact-value scrub removes it
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "soak"}]}
ABSURD = [
    {"usage": {"prompt_tokens": -5, "completion_tokens": 3}},
    {"usage": {"prompt_tokens": 10**30, "completion_tokens": 3}},
    {"usage": {"prompt_tokens": 10, "completion_tokens": 5}, "metadata": {"costs": {"total_tokens": 1e308}}},
    {"usage": {"prompt_tokens": 10, "completion_tokens": 5}, "metadata": {"costs": {"total_tokens": -79683.57}}},
    {"usage": {"prompt_tokens": 10, "completion_tokens": 5}, "metadata": {"costs": {"total_tokens": 0.25}}},
]
#: (weight, case)
CASES = [
    (40, "ok"),
    (20, "stream"),
    (10, "usage"),
    (6, "echo-key"),
    (3, "bomb-gzip"),
    (3, "bomb-br"),
    (3, "bomb-zstd"),
    (3, "bomb-gzip-stream"),
    (4, "big"),
    (8, "hangup"),
]


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def one(client: httpx.Client, case: str, rng: random.Random) -> None:
    headers = {"authorization": f"Bearer {KEY}"}
    body = dict(BODY)
    if case == "ok":
        headers["x-hostile"] = "ok"
    elif case == "usage":
        headers.update({"x-hostile": "usage", "x-hostile-usage": json.dumps(rng.choice(ABSURD))})
    elif case == "echo-key":
        headers["x-hostile"] = "echo-key"
    elif case.startswith("bomb"):
        headers.update(
            {
                "x-hostile": "bomb",
                "x-hostile-encoding": case.split("-")[1],
                "x-hostile-stream": "1" if case.endswith("stream") else "0",
                "x-hostile-size": str(64 << 20),
            }
        )
        body["stream"] = case.endswith("stream")
    elif case == "big":
        headers.update({"x-hostile": "big", "x-hostile-encoding": rng.choice(["identity", "gzip"])})
    elif case in ("stream", "hangup"):
        headers.update({"x-hostile": "stream", "x-hostile-events": "50", "x-hostile-delay": "0.01"})
        body["stream"] = True
    with client.stream("POST", "/chat/completions", json=body, headers=headers) as response:
        for i, _ in enumerate(response.iter_raw()):
            if case == "hangup" and i >= 3:
                break  # the client goes away mid-stream


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--sample-every", type=float, default=5.0)
    args = parser.parse_args()
    rng = random.Random(12)
    weights, names = zip(*CASES)
    with tempfile.TemporaryDirectory(prefix="llmtap-soak-") as tmp:
        workdir = Path(tmp)
        port = procs.free_port()
        upstream = procs.start(
            "hostile",
            [sys.executable, "-m", "llmtap.devtools.hostile", "--port", str(port)],
            port,
            procs.LOAD_CPU,
            workdir,
        )
        tap = procs.llmtap("llmtap", upstream.url, workdir, lean=True)
        sent = {name: 0 for name in names}
        failures: dict[str, int] = {}
        lock = threading.Lock()
        deadline = time.monotonic() + args.seconds
        samples: list[tuple[float, float, int, float, int]] = []

        def worker(seed: int) -> None:
            local = random.Random(seed)
            with httpx.Client(base_url=f"{tap.url}/v1", timeout=120) as client:
                while time.monotonic() < deadline:
                    case = local.choices(names, weights)[0]
                    try:
                        one(client, case, local)
                    except httpx.HTTPError as exc:
                        with lock:
                            failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                    with lock:
                        sent[case] += 1

        def sampler() -> None:
            started = time.monotonic()
            while time.monotonic() < deadline:
                writer = tap.extra.get("writer_pid")
                samples.append(
                    (
                        time.monotonic() - started,
                        tap.rss_mb(),
                        fds(tap.pid),
                        procs.rss_mb(writer) if writer else 0.0,
                        fds(writer) if writer else 0,
                    )
                )
                time.sleep(args.sample_every)

        threads = [threading.Thread(target=worker, args=(rng.random(),)) for _ in range(args.workers)]
        threads.append(threading.Thread(target=sampler))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        time.sleep(2)
        metrics_port = tap.extra["metrics_port"]
        metric_cost = metric(metrics_port, "llmtap_cost_usd_total")
        anomalies = metric(metrics_port, "llmtap_anomalies_total")
        dropped = metric(metrics_port, "llmtap_audit_dropped_total")
        tap.stop(60)
        upstream.stop()
        db = sqlite3.connect(tap.extra["db"])
        rows, cost, negatives = db.execute(
            "SELECT count(*), total(cost_nanousd) / 1e9, sum(cost_usd < 0 OR input_tokens < 0) FROM exchanges"
        ).fetchone()
        by_error = dict(db.execute("SELECT coalesce(error_type, 'ok'), count(*) FROM exchanges GROUP BY 1"))
        problems = db.execute("SELECT count(*) FROM exchanges WHERE parse_problem IS NOT NULL").fetchone()[0]
        db.close()
        leaked = any(KEY.encode() in p.read_bytes() for p in workdir.iterdir() if p.is_file())
        total = sum(sent.values())
        print(f"soak: {args.seconds:.0f}s, {args.workers} workers, load average {procs.load_average()}")
        print(f"  requests sent {total}: {sent}")
        print(f"  client-side failures: {failures or 'none'}")
        print(f"  audit rows {rows} (== requests: {rows == total}); by outcome {by_error}")
        print(f"  rows with parse_problem {problems}; anomalies counted {anomalies:.0f}; audit dropped {dropped:.0f}")
        print(f"  cost: metrics {metric_cost:.9f} vs audit {cost:.9f} (equal: {abs(metric_cost - cost) < 1e-6})")
        print(f"  negative cost or tokens in the audit log: {negatives or 0}; key found on disk: {leaked}")
        if samples:
            for label, column in (("proxy RSS MB", 1), ("proxy fds", 2), ("writer RSS MB", 3), ("writer fds", 4)):
                values = [s[column] for s in samples]
                print(
                    f"  {label:14s} first {values[0]:.0f}  median {statistics.median(values):.0f}  "
                    f"peak {max(values):.0f}  last {values[-1]:.0f}"
                )
        return 0 if rows == total and abs(metric_cost - cost) < 1e-6 and not leaked else 1


if __name__ == "__main__":
    sys.exit(main())
