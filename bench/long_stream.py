"""One stream of 100,000 tiny SSE events: direct, through bare mitmdump, through llmtap.

The adversarial run measured 6.9 s through llmtap against 1.5 s direct: the cost was llmtap's
own parsing (a partial line re-copied on every chunk). The baseline that matters is bare
mitmdump forwarding the stream as it arrives (``bench/stream_only.py``), since mitmproxy's own
per-chunk work is not llmtap's to remove; the goal is llmtap <= 1.1x that.

    .venv/bin/python bench/long_stream.py [--events 100000] [--runs 5]

The upstream (``llmtap.devtools.hostile``) and this client share one core, the proxy under test
has the other; each run is one request on a new connection, timed from the request to the
last byte (the connection closes after the response).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs


def one_stream(port: int, events: int) -> tuple[float, int]:
    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "go"}]})
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"x-hostile: stream\r\nx-hostile-events: {events}\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        started = time.perf_counter()
        sock.sendall(request)
        received = 0
        while data := sock.recv(1 << 20):
            received += len(data)
        return time.perf_counter() - started, received


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    procs.pin_self(procs.LOAD_CPU)
    with tempfile.TemporaryDirectory(prefix="llmtap-long-stream-") as tmp:
        workdir = Path(tmp)
        port = procs.free_port()
        upstream = procs.start(
            "hostile",
            [sys.executable, "-m", "llmtap.devtools.hostile", "--port", str(port)],
            port,
            procs.LOAD_CPU,
            workdir,
        )
        targets = {"direct": upstream}
        try:
            targets["mitmdump"] = procs.mitmdump(
                "mitmdump", upstream.url, workdir, str(procs.ROOT / "bench" / "stream_only.py")
            )
            targets["llmtap"] = procs.llmtap("llmtap", upstream.url, workdir, lean=True)
            results, cpu_used = {}, {}
            for name, proc in targets.items():
                one_stream(proc.port, 1000)  # warm up
                times, cpus, sizes = [], [], set()
                for _ in range(args.runs):
                    cpu = proc.cpu_seconds()
                    elapsed, size = one_stream(proc.port, args.events)
                    cpus.append(proc.cpu_seconds() - cpu)
                    times.append(elapsed)
                    sizes.add(size)
                results[name] = statistics.median(times)
                cpu_used[name] = statistics.median(cpus)
                print(
                    f"{name:9s} median {results[name]:.3f}s (process CPU {cpu_used[name]:.3f}s)  "
                    f"runs {[round(t, 3) for t in times]}  bytes {sorted(sizes)}"
                )
            ratio = results["llmtap"] / results["mitmdump"]
            print(f"llmtap / bare mitmdump (stream-only addon): {ratio:.2f}x wall time  (goal <= 1.1x)")
            print(f"  proxy CPU per stream: llmtap {cpu_used['llmtap']:.3f}s, mitmdump {cpu_used['mitmdump']:.3f}s")
            print(f"llmtap / direct: {results['llmtap'] / results['direct']:.2f}x; load average {procs.load_average()}")
        finally:
            for proc in targets.values():
                proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
