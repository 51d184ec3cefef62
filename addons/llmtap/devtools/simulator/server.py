"""The simulator's server: HTTP/1.1 framing, routing, authentication, faults and content-encodings.

It speaks just enough HTTP/1.1 (keep-alive, chunked bodies both ways, ``Expect: 100-continue``)
on a bare asyncio server, so thousands of requests per second cost little CPU and no network
access is ever needed. What a family answers is in its own module (``chat``, ``responses``,
``embeddings``, ``anthropic``, ``gemini``): a handler turns a :class:`~.common.Call` into a reply,
and this module writes it. Every exchange is kept in :attr:`Simulator.exchanges` exactly as it
went over the wire, so a test can compare what llmtap recorded with what really happened.

Test hooks are request headers: ``X-Sim-Fault`` (see :data:`FAULTS` and :data:`FAMILY_FAULTS`),
``X-Sim-Encoding`` (gzip, deflate, br, zstd), ``X-Sim-Stream-Usage: none`` (Pulze) and
``X-Sim-SSE: crlf``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import secrets
import signal
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from llmtap.devtools.simulator import anthropic, chat, embeddings, gemini, responses
from llmtap.devtools.simulator.common import (
    BadRequest,
    Call,
    Route,
    StreamReply,
    dumps,
)
from llmtap.devtools.simulator.encoding import ENCODINGS, Encoder, coding_of, encode_body

#: Values of the ``X-Sim-Fault`` header (and what ``fault_rate`` draws from).
FAULTS = ("429", "500", "422", "truncate", "slow-first-byte", "retry", "disconnect")
#: Faults only asked for by header, on the families that have them: ``stream-error`` (an error
#: event inside a 200 stream: Anthropic, OpenAI Responses), ``incomplete`` (Responses stopped by
#: ``max_output_tokens``), ``failed`` (Responses ``response.failed``).
FAMILY_FAULTS = ("stream-error", "incomplete", "failed")
#: Stream events sent before a ``truncate`` fault cuts the connection.
TRUNCATE_AFTER = 3

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_SERVER = "llmtap-simulator"


ROUTES: tuple[Route, ...] = (
    *(Route(m, p, h, faults=p.endswith("completions")) for m, p, h in chat.ROUTES),
    *chat.OTHER_ROUTES,
    *responses.ROUTES,
    *responses.AZURE_ROUTES,
    *embeddings.ROUTES,
    *embeddings.AZURE_ROUTES,
    *anthropic.ROUTES,
    *gemini.ROUTES,
)


def _authorised(auth: str, headers: dict[str, str], query: dict[str, str]) -> bool:
    bearer = headers.get("authorization", "")
    has_bearer = bearer.startswith("Bearer ") and bool(bearer[7:].strip())
    if auth == "x-api-key":
        return bool(headers.get("x-api-key", "").strip()) or has_bearer
    if auth == "google":
        return bool(headers.get("x-goog-api-key", "").strip() or query.get("key")) or has_bearer
    if auth == "azure":
        return bool(headers.get("api-key", "").strip()) or has_bearer
    return has_bearer


@dataclass(slots=True)
class SimExchange:
    """One request as the simulator saw it and one response exactly as it wrote it.

    It is appended to :attr:`Simulator.exchanges` when the request arrives and filled in
    before the last byte is written, so it is complete by the time a client sees the end.
    """

    method: str
    path: str
    request_headers: dict[str, str]
    request_body: bytes
    request_id: str
    started_at: float
    status: int = 0  # 0: no response was sent (fault "disconnect")
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    response_body: bytes = b""  # on the wire: content-encoded, de-chunked
    decoded_body: bytes = b""
    response_json: dict[str, Any] | list[Any] | None = None
    stream_events: list[dict[str, Any]] = field(default_factory=list)
    fault: str | None = None
    completed: bool = False
    stream: bool = False
    finished_at: float | None = None
    query: str = ""


class Simulator:
    """Pulze, OpenAI, Azure OpenAI, OpenRouter, Anthropic and Gemini APIs on loopback, in a daemon thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        chunk_delay: float = 0.02,
        first_byte_delay: float = 0.0,
        seed: int = 0,
        fault_rate: float = 0.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.tls = tls  # serve HTTPS, for regular-proxy (HTTPS_PROXY) tests
        self.chunk_delay, self.first_byte_delay = chunk_delay, first_byte_delay
        self.seed, self.fault_rate = seed, fault_rate
        self.exchanges: list[SimExchange] = []  # appended only from the loop thread
        self.record_exchanges = True
        self.templates: dict[tuple[Any, ...], bytes] = {}  # see chat.complete
        self.background: dict[str, dict[str, Any]] = {}  # OpenAI Responses in background mode
        self.prompt_cache: dict[bytes, float] = {}  # Anthropic prompt caching
        self._rng = random.Random(seed)
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(4)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def clear(self) -> None:
        self.exchanges.clear()

    def remember(self, key: tuple[Any, ...], template: bytes) -> bytes:
        """Keep a serialised answer for identical requests (bounded)."""
        if len(self.templates) >= 4096:
            self.templates.clear()
        self.templates[key] = template
        return template

    def start(self) -> Simulator:
        """Start serving in a background thread; returns once the port is listening."""
        ready = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,), name="llmtap-sim", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("simulator did not start listening within 10 s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _thread_main(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self.run(ready.set))
        except BaseException as exc:  # surfaced by start()
            self._error = exc
        finally:
            ready.set()

    async def run(self, on_ready: Callable[[], None], handle_signals: bool = False) -> None:
        """Serve on the running loop until :meth:`stop` (or SIGINT/SIGTERM if asked)."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self._stopping.set)
        server = await asyncio.start_server(self._connection, self.host, self.port, backlog=4096, ssl=self.tls)
        self.port = server.sockets[0].getsockname()[1]
        on_ready()
        await self._stopping.wait()
        server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    # ----------------------------------------------------------------- HTTP/1.1

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve requests on one connection until the client or a fault closes it."""
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # the client went away or spoke nonsense: just drop the connection
        except asyncio.CancelledError:
            pass  # stop(): ending quietly keeps asyncio's connection callback from logging it
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read one request and answer it; return whether the connection stays open."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.lstrip(b"\r\n").decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        else:
            body = await reader.readexactly(int(headers.get("content-length") or 0))
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        split = urlsplit(target)
        ex = SimExchange(method, split.path, headers, body, f"sim-{self._id_prefix}-{next(self._ids)}", time.time())
        ex.query = split.query
        if self.record_exchanges:
            self.exchanges.append(ex)
        coding = coding_of(headers)
        try:
            return await self._dispatch(ex, writer, keep_alive, coding)
        except BadRequest as err:
            return await self._send_json(ex, writer, keep_alive, err.status, err.body, coding)

    async def _dispatch(
        self, ex: SimExchange, writer: asyncio.StreamWriter, keep_alive: bool, coding: str | None
    ) -> bool:
        t0 = time.monotonic()
        headers = ex.request_headers
        if coding is None and "x-sim-encoding" in headers:
            raise BadRequest(400, {"detail": f"X-Sim-Encoding must be one of {', '.join(ENCODINGS)}"})
        matches = [(r, m) for r in ROUTES if (m := r.regex.match(ex.path))]
        if not matches:
            raise BadRequest(404, {"detail": "Not Found"})
        found = next(((r, m) for r, m in matches if r.method == ex.method), None)
        if found is None:
            raise BadRequest(405, {"detail": "Method Not Allowed"})
        route, match = found
        query = dict(parse_qsl(ex.query))
        if not _authorised(route.auth, headers, query):
            raise route.error(401, "Not authenticated")
        fault = None
        if route.faults:
            fault = headers.get("x-sim-fault", "").lower() or None
            if fault is None and self.fault_rate and self._rng.random() < self.fault_rate:
                fault = self._rng.choice(FAULTS)
            if fault is not None and fault not in FAULTS and fault not in FAMILY_FAULTS:
                raise BadRequest(400, {"detail": f"X-Sim-Fault must be one of {', '.join(FAULTS + FAMILY_FAULTS)}"})
        ex.fault = fault
        if fault == "disconnect":
            ex.finished_at = time.time()
            return False
        if fault == "429":
            err = route.error(429, "Rate limit exceeded, retry later")
            return await self._send_json(ex, writer, keep_alive, 429, err.body, coding, [("retry-after", "1")])
        if fault == "500":
            html = b"<html><head><title>500</title></head><body><h1>Internal Server Error</h1></body></html>"
            return await self._send(ex, writer, keep_alive, 500, html, "text/html; charset=utf-8", coding)
        if fault == "422":
            raise route.error(422, "simulated validation error")
        call = Call(ex.method, ex.path, query, match.groupdict(), headers, ex.request_body, ex.request_id, fault, t0)
        reply = route.handler(self, call)
        delay = (self.first_byte_delay or 0.5) if fault == "slow-first-byte" else self.first_byte_delay
        if delay:
            await asyncio.sleep(delay)
        if isinstance(reply, StreamReply):
            ex.stream = True
            return await self._send_stream(ex, writer, keep_alive, coding, reply)
        body = reply.body() if callable(reply.body) else reply.body
        if self.record_exchanges:
            try:
                ex.response_json = json.loads(body)
            except ValueError:
                pass
        return await self._send(
            ex,
            writer,
            keep_alive,
            reply.status,
            body,
            reply.content_type,
            coding,
            reply.headers,
            truncate=fault == "truncate",
        )

    # ----------------------------------------------------------------- writing

    async def _send_json(
        self,
        ex: SimExchange,
        writer: asyncio.StreamWriter,
        keep_alive: bool,
        status: int,
        body: dict[str, Any],
        coding: str | None = None,
        extra: list[tuple[str, str]] | None = None,
    ) -> bool:
        ex.response_json = body
        return await self._send(ex, writer, keep_alive, status, dumps(body), "application/json", coding, extra)

    async def _send(
        self,
        ex: SimExchange,
        writer: asyncio.StreamWriter,
        keep_alive: bool,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        coding: str | None = None,
        extra: list[tuple[str, str]] | None = None,
        truncate: bool = False,
    ) -> bool:
        """Write a Content-Length response; ``truncate`` sends half the body and closes."""
        wire = encode_body(coding, body) if coding else body
        headers = [
            ("content-type", content_type),
            ("content-length", str(len(wire))),
            ("x-request-id", ex.request_id),
            ("server", _SERVER),
        ]
        if coding:
            headers.append(("content-encoding", coding))
        headers.extend(extra or ())
        keep_alive = keep_alive and not truncate
        if not keep_alive:
            headers.append(("connection", "close"))
        sent = wire[: len(wire) // 2] if truncate else wire
        ex.status, ex.response_headers, ex.response_body, ex.decoded_body = status, headers, sent, body
        ex.completed, ex.finished_at = not truncate, time.time()
        writer.write(_head(status, headers) + sent)
        await writer.drain()
        return keep_alive

    async def _send_stream(
        self,
        ex: SimExchange,
        writer: asyncio.StreamWriter,
        keep_alive: bool,
        coding: str | None,
        reply: StreamReply,
    ) -> bool:
        """Write a stream over chunked encoding, one event per chunk, ``chunk_delay`` apart."""
        comments = ex.request_headers.get("x-sim-sse", "").lower() == "crlf"  # with ": keep-alive" lines
        crlf = reply.crlf or comments
        nl = b"\r\n" if crlf else b"\n"
        style = reply.style
        headers = [
            ("content-type", reply.content_type),
            ("transfer-encoding", "chunked"),
            ("cache-control", "no-cache"),
            ("x-request-id", ex.request_id),
            ("server", _SERVER),
            *reply.headers,
        ]
        if coding:
            headers.append(("content-encoding", coding))
        if not keep_alive:
            headers.append(("connection", "close"))
        ex.status, ex.response_headers = 200, headers
        writer.write(_head(200, headers))
        encoder = Encoder(coding) if coding else None
        wire: list[bytes] = []
        decoded: list[bytes] = []

        def frame(payload: bytes) -> bytes:
            decoded.append(payload)
            data = encoder.chunk(payload) if encoder else payload
            if not data:  # an empty chunk would end the body
                return b""
            wire.append(data)
            return b"%x\r\n%b\r\n" % (len(data), data)

        def settle(completed: bool) -> None:
            ex.response_body, ex.decoded_body = b"".join(wire), b"".join(decoded)
            ex.completed, ex.finished_at = completed, time.time()

        try:
            for i, (final, event) in enumerate(reply.events):
                if ex.fault == "truncate" and (i >= TRUNCATE_AFTER or final):
                    settle(False)
                    await writer.drain()
                    return False
                if i:
                    if self.chunk_delay:
                        await asyncio.sleep(self.chunk_delay)
                    if comments and style != "array":
                        writer.write(frame(b": keep-alive" + nl + nl))
                ex.stream_events.append(event)
                if style == "array":
                    writer.write(frame((b"[" if i == 0 else b",\r\n") + dumps(event)))
                elif style == "typed":
                    writer.write(frame(b"event: " + event["type"].encode() + nl + b"data: " + dumps(event) + nl + nl))
                else:
                    writer.write(frame(b"data: " + dumps(event) + nl + nl))
                await writer.drain()
        except BaseException:  # the client left (or stop()): keep what was sent
            settle(False)
            raise
        if style == "array":
            done = frame(b"]")
        else:
            done = frame(b"data: " + reply.done + nl + nl) if reply.done is not None else b""
        tail = encoder.finish() if encoder else b""
        if tail:
            wire.append(tail)
            done += b"%x\r\n%b\r\n" % (len(tail), tail)
        settle(True)
        writer.write(done + b"0\r\n\r\n")
        await writer.drain()
        return keep_alive


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """De-chunk a ``Transfer-Encoding: chunked`` request body (extensions and trailers ignored)."""
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n{lines}\r\n".encode("latin-1")


def run_simulator(
    host: str = "127.0.0.1",
    port: int = 8000,
    chunk_delay: float = 0.02,
    first_byte_delay: float = 0.0,
    fault_rate: float = 0.0,
    seed: int = 0,
) -> None:
    """Run a simulator in the foreground until Ctrl-C or SIGTERM (``llmtap simulate``).

    Exchanges are not kept: a long-running simulator must not grow without bound.
    """
    sim = Simulator(host, port, chunk_delay, first_byte_delay, seed, fault_rate)
    sim.record_exchanges = False
    asyncio.run(
        sim.run(
            lambda: print(f"llmtap simulator listening on {sim.url} (Ctrl-C to stop)", flush=True), handle_signals=True
        )
    )
