"""Streaming timing: when each SSE event reaches the client, over one kept-alive connection.

A plain blocking socket and ``time.perf_counter`` right after each ``recv``: no HTTP library
between the wire and the clock. The connection is reused for every stream (as SDK connection
pools do), so neither the client's nor the proxy's upstream connect lands in the numbers.
"""

from __future__ import annotations

import dataclasses
import socket
import statistics
import time
from dataclasses import dataclass

from load import CHAT_PATH, HEADERS, chat_body

STREAM_BODY = chat_body("Tell me a story about streams, chunk by chunk.", stream=True)


@dataclass(frozen=True)
class StreamTiming:
    first_chunk_ms: float  # request sent -> first SSE event received
    gaps_ms: tuple[float, ...]  # between successive reads that carried events
    events: int
    reads_with_events: int  # == events unless something buffered and coalesced them


class StreamClient:
    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = STREAM_BODY.encode()
        head = [
            f"POST {CHAT_PATH} HTTP/1.1",
            f"Host: {host}:{port}",
            f"Content-Length: {len(body)}",
            "Accept: text/event-stream",
            *(f"{k}: {v}" for k, v in HEADERS.items()),
        ]
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode() + body

    def close(self) -> None:
        self.sock.close()

    def stream(self) -> StreamTiming:
        """Send one streamed completion and time every event until the terminating chunk."""
        buf = b""
        arrivals: list[tuple[float, int]] = []
        started = time.perf_counter()
        self.sock.sendall(self.request)
        headers_done = False
        while True:
            data = self.sock.recv(65536)
            now = time.perf_counter()
            if not data:
                raise ConnectionError("connection closed mid-stream")
            if not headers_done:
                buf += data
                if b"\r\n\r\n" not in buf:
                    continue
                head, data = buf.split(b"\r\n\r\n", 1)
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"stream request failed: {head[:200]!r}")
                headers_done, buf = True, b""
            if events := data.count(b"data: "):
                arrivals.append((now, events))
            buf = (buf + data)[-16:]
            if buf.endswith(b"\r\n0\r\n\r\n"):
                break
        times = [t for t, _ in arrivals]
        return StreamTiming(
            first_chunk_ms=(times[0] - started) * 1e3,
            gaps_ms=tuple((b - a) * 1e3 for a, b in zip(times, times[1:])),
            events=sum(n for _, n in arrivals),
            reads_with_events=len(arrivals),
        )


@dataclass(frozen=True)
class StreamSummary:
    first_chunk_p50_ms: float
    first_chunk_p90_ms: float
    gap_p50_ms: float
    gap_p99_ms: float
    events_per_stream: float
    coalesced_share: float  # share of events that arrived together with an earlier one


def measure(host: str, port: int, streams: int) -> StreamSummary:
    client = StreamClient(host, port)
    try:
        client.stream()  # warm: connection, upstream connection, caches
        timings = [client.stream() for _ in range(streams)]
    finally:
        client.close()
    firsts = sorted(t.first_chunk_ms for t in timings)
    gaps = sorted(g for t in timings for g in t.gaps_ms)
    events = sum(t.events for t in timings)
    return StreamSummary(
        first_chunk_p50_ms=statistics.median(firsts),
        first_chunk_p90_ms=_percentile(firsts, 90),
        gap_p50_ms=statistics.median(gaps),
        gap_p99_ms=_percentile(gaps, 99),
        events_per_stream=events / len(timings),
        coalesced_share=1 - sum(t.reads_with_events for t in timings) / events,
    )


def median_summary(runs: list[StreamSummary]) -> StreamSummary:
    """Each measure's median over several runs."""
    return StreamSummary(
        *(statistics.median(getattr(r, f.name) for r in runs) for f in dataclasses.fields(StreamSummary))
    )


def _percentile(sorted_values: list[float], pct: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[index]
