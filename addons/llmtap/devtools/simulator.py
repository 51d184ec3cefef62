"""A simulated Pulze.ai upstream: the ground truth that the demo, the tests and the benchmarks use.

It speaks just enough HTTP/1.1 (keep-alive, chunked bodies both ways, ``Expect: 100-continue``)
on a bare asyncio server, so thousands of requests per second cost little CPU and no network
access is ever needed. Every answer is deterministic for a given prompt and seed, and every
exchange is kept in :attr:`Simulator.exchanges` exactly as it went over the wire, so a test can
compare what llmtap recorded with what really happened.

Test hooks are request headers: ``X-Sim-Fault`` (see :data:`FAULTS`), ``X-Sim-Encoding``
(gzip, deflate, br, zstd), ``X-Sim-Stream-Usage: none``, ``X-Sim-SSE: crlf`` and ``X-Sim-Metadata: none``
(a plain OpenAI-compatible upstream: no Pulze metadata, stream usage only when asked for).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import random
import secrets
import signal
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from http import HTTPStatus
from typing import Any, NamedTuple
from urllib.parse import urlsplit

try:
    import brotli
except ImportError:  # optional: only needed for X-Sim-Encoding: br
    brotli = None
try:
    import zstandard
except ImportError:  # optional: only needed for X-Sim-Encoding: zstd
    zstandard = None


class ListPrice(NamedTuple):
    """USD per one million tokens."""

    prompt: float
    completion: float


#: The provider models the simulator serves, with their list prices (USD per 1M tokens).
PRICES: dict[str, ListPrice] = {
    "openai/gpt-4o-mini": ListPrice(0.15, 0.60),
    "openai/gpt-4o": ListPrice(2.50, 10.00),
    "anthropic/claude-3-haiku": ListPrice(0.25, 1.25),
    "mistralai/mistral-small": ListPrice(0.20, 0.60),
    "meta/llama-3-8b-instruct": ListPrice(0.05, 0.25),
}
#: Pulze reports ``cost_savings`` against GPT-4 list prices.
REFERENCE_PRICE = ListPrice(30.0, 60.0)
#: Requested model names that mean "Pulze picks the model".
ROUTER_MODELS = frozenset({"pulze", "pulze-v0", "pulze-v0.1", "pulze-v1.0"})
#: Values of the ``X-Sim-Fault`` header (and what ``fault_rate`` draws from).
FAULTS = ("429", "500", "422", "truncate", "slow-first-byte", "retry", "disconnect")
#: Stream events sent before a ``truncate`` fault cuts the connection.
TRUNCATE_AFTER = 3

_NAMESPACES = tuple(PRICES)
_ALIASES = {**{ns: ns for ns in PRICES}, **{ns.split("/", 1)[1]: ns for ns in PRICES}}
_MODEL_INFO = {
    ns: {
        "model": ns.split("/", 1)[1],
        "provider": ns.split("/", 1)[0],
        "owner": ns.split("/", 1)[0],
        "namespace": ns,
        "at": "2024-06-01",
    }
    for ns in PRICES
}
_CATEGORIES = ("general", "coding", "summarization", "creative-writing", "question-answering")
_VOCAB = [
    "the",
    "model",
    "considers",
    "your",
    "question",
    "and",
    "answers",
    "it",
    "with",
    "care",
    "using",
    "a",
    "few",
    "plain",
    "words",
    "about",
    "latency",
    "cost",
    "tokens",
    "routing",
    "providers",
    "quality",
    "streams",
    "requests",
    "responses",
    "metrics",
    "proxy",
    "observes",
    "every",
    "exchange",
    "so",
    "that",
    "teams",
    "can",
    "see",
    "spend",
    "per",
    "label",
    "and",
    "per",
    "app",
    "while",
    "developers",
    "keep",
    "shipping",
    "features",
    "quickly",
    "without",
    "surprises",
    "in",
    "the",
    "monthly",
    "invoice",
]
_REASONS = {s.value: s.phrase for s in HTTPStatus}
_SERVER = "llmtap-simulator"
_ROUTES = {"/v1/chat/completions": "POST", "/v1/completions": "POST", "/v1/models": "GET", "/v1/models/rank": "POST"}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


_MODELS_LIST = _dumps(
    {
        "object": "list",
        "data": [
            {"id": ns, "object": "model", "created": 1717200000, "owned_by": info["owner"]}
            for ns, info in _MODEL_INFO.items()
        ],
    }
)


def _cost_dict(prompt: float, completion: float) -> dict[str, float]:
    prompt, completion = round(prompt, 10), round(completion, 10)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def costs_for(namespace: str, prompt_tokens: int, completion_tokens: int) -> tuple[dict, dict]:
    """``(costs, cost_savings)`` in USD, each part rounded to 10 places, total = sum of parts."""
    price = PRICES[namespace]
    prompt, completion = prompt_tokens * price.prompt / 1e6, completion_tokens * price.completion / 1e6
    return _cost_dict(prompt, completion), _cost_dict(
        prompt_tokens * REFERENCE_PRICE.prompt / 1e6 - prompt,
        completion_tokens * REFERENCE_PRICE.completion / 1e6 - completion,
    )


@lru_cache(maxsize=1024)
def app_id_for(api_key: str) -> str:
    """A stable per-key app id, as Pulze attributes every request to an app."""
    return "app-" + hashlib.sha256(api_key.encode()).hexdigest()[:8]


@lru_cache(maxsize=8192)
def _words(key: int) -> tuple[str, ...]:
    """Deterministic 8-40 word answer; cached because benchmarks repeat prompts."""
    rng = random.Random(key)
    words = rng.choices(_VOCAB, k=rng.randint(8, 40))
    words[0] = words[0].capitalize()
    words[-1] += "."
    return tuple(words)


class _Encoder:
    """Content-encoder that can flush after every SSE event so streams stay incremental."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        if coding in ("gzip", "deflate"):
            self._c: Any = zlib.compressobj(wbits=31 if coding == "gzip" else 15)
        elif coding == "br":
            self._c = brotli.Compressor()
        else:
            self._c = zstandard.ZstdCompressor().compressobj()

    def chunk(self, data: bytes) -> bytes:
        if self.coding == "br":
            return self._c.process(data) + self._c.flush()
        if self.coding == "zstd":
            return self._c.compress(data) + self._c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        return self._c.compress(data) + self._c.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._c.finish() if self.coding == "br" else self._c.flush()


def encode_body(coding: str, data: bytes) -> bytes:
    """One-shot content-encoding of a whole body (zstd frames then carry their content size)."""
    if coding == "gzip":
        return zlib.compress(data, wbits=31)
    if coding == "deflate":
        return zlib.compress(data)
    if coding == "br":
        return brotli.compress(data)
    return zstandard.ZstdCompressor().compress(data)


ENCODINGS = tuple(c for c, ok in (("gzip", 1), ("deflate", 1), ("br", brotli), ("zstd", zstandard)) if ok)


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
    response_json: dict[str, Any] | None = None
    stream_events: list[dict[str, Any]] = field(default_factory=list)
    fault: str | None = None
    completed: bool = False
    stream: bool = False
    finished_at: float | None = None


class _BadRequest(Exception):
    """A request the simulator answers with an error status instead of a completion."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status, self.body = status, body


def _invalid(loc: list[Any], msg: str, kind: str) -> _BadRequest:
    return _BadRequest(422, {"detail": [{"loc": loc, "msg": msg, "type": kind}]})


@dataclass(slots=True)
class _Completion:
    """A validated completion request and the deterministic answer to it."""

    chat: bool
    namespace: str
    prompt_tokens: int
    answers: list[tuple[str, ...]]
    finish: list[str]
    score: float
    candidates: list[dict[str, float]]
    category: str
    temperature: float
    max_tokens: int | None
    labels: dict[str, str]
    app_id: str
    stream: bool
    stream_usage: bool  # False when X-Sim-Stream-Usage: none
    # X-Sim-Metadata: none answers as a plain OpenAI-compatible upstream: no Pulze metadata
    # (so no reported cost), and stream usage only with stream_options.include_usage
    plain: bool = False


def _prompt_of(payload: dict[str, Any], chat: bool) -> tuple[str, int]:
    """Prompt text (for hashing) and its token count: words plus OpenAI-like per-message overhead."""
    key = "messages" if chat else "prompt"
    value = payload.get(key)
    if value is None:
        raise _invalid(["body", key], "field required", "value_error.missing")
    if not value:
        raise _invalid(["body", key], "ensure this value has at least 1 items", "value_error.any_str.min_length")
    if not chat:
        parts = [value] if isinstance(value, str) else value
        if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
            raise _invalid(["body", "prompt"], "str type expected", "type_error.str")
        text = "\n".join(parts)
        return text, max(1, len(text.split()))
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise _invalid(["body", "messages"], "value is not a valid list", "type_error.list")
    texts = []
    for message in value:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        texts.append(content if isinstance(content, str) else "")
    return "\n".join(texts), sum(len(t.split()) + 4 for t in texts) + 3


def _labels(headers: dict[str, str]) -> dict[str, str]:
    """Echo ``Pulze-Labels`` (values lower-cased) plus ``weights_*``/``policies_*`` like Pulze."""
    labels: dict[str, str] = {}
    for header, prefix in (("pulze-labels", ""), ("pulze-weights", "weights_"), ("pulze-policies", "policies_")):
        raw = headers.get(header)
        if not raw:
            continue
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise _invalid(["header", header], "value is not a valid dict", "type_error.dict")
        for k, v in parsed.items():
            labels[prefix + str(k)] = str(v).lower() if not prefix else json.dumps(v).strip('"')
    return labels


class Simulator:
    """A Pulze-compatible API on loopback, run on its own event loop in a daemon thread."""

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
        self._rng = random.Random(seed)
        self._templates: dict[tuple[Any, ...], bytes] = {}
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
        path = urlsplit(target).path if target.startswith("http") else target.split("?", 1)[0]
        ex = SimExchange(method, path, headers, body, f"sim-{self._id_prefix}-{next(self._ids)}", time.time())
        if self.record_exchanges:
            self.exchanges.append(ex)
        try:
            return await self._dispatch(ex, writer, keep_alive)
        except _BadRequest as err:
            return await self._send_json(ex, writer, keep_alive, err.status, err.body, _coding(headers))

    async def _dispatch(self, ex: SimExchange, writer: asyncio.StreamWriter, keep_alive: bool) -> bool:
        coding = _coding(ex.request_headers)
        if coding is None and "x-sim-encoding" in ex.request_headers:
            raise _BadRequest(400, {"detail": f"X-Sim-Encoding must be one of {', '.join(ENCODINGS)}"})
        route = _ROUTES.get(ex.path)
        if route is None:
            raise _BadRequest(404, {"detail": "Not Found"})
        if ex.method != route:
            raise _BadRequest(405, {"detail": "Method Not Allowed"})
        auth = ex.request_headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            raise _BadRequest(401, {"detail": "Not authenticated"})
        if ex.path == "/v1/models":
            return await self._send(ex, writer, keep_alive, 200, _MODELS_LIST, coding=coding)
        if ex.path == "/v1/models/rank":
            payload = _parse_json(ex.request_body)
            chat = "messages" in payload and "prompt" not in payload
            text, _ = _prompt_of(payload, chat)
            ns, score, candidates, category = _route(_digest(text), None)
            body = {"best_model": ns, "score": score, "candidates": candidates, "category": category}
            return await self._send_json(ex, writer, keep_alive, 200, body, coding)
        return await self._complete(ex, writer, keep_alive, coding)

    async def _complete(
        self, ex: SimExchange, writer: asyncio.StreamWriter, keep_alive: bool, coding: str | None
    ) -> bool:
        t0 = time.monotonic()
        headers = ex.request_headers
        fault = headers.get("x-sim-fault", "").lower() or None
        if fault is None and self.fault_rate and self._rng.random() < self.fault_rate:
            fault = self._rng.choice(FAULTS)
        if fault is not None and fault not in FAULTS:
            raise _BadRequest(400, {"detail": f"X-Sim-Fault must be one of {', '.join(FAULTS)}"})
        ex.fault = fault
        if fault == "disconnect":
            ex.finished_at = time.time()
            return False
        if fault == "429":
            body = {
                "error": {"message": "Rate limit exceeded, retry later", "type": "rate_limit_exceeded", "code": 429}
            }
            return await self._send_json(ex, writer, keep_alive, 429, body, coding, [("retry-after", "1")])
        if fault == "500":
            html = b"<html><head><title>500</title></head><body><h1>Internal Server Error</h1></body></html>"
            return await self._send(ex, writer, keep_alive, 500, html, "text/html; charset=utf-8", coding)
        if fault == "422":
            raise _invalid(["body", "model"], "simulated validation error", "value_error")
        chat = ex.path == "/v1/chat/completions"
        # Answers are deterministic, so an identical request reuses its serialised body and only
        # the id, timestamp and latency change: that keeps benchmarks measuring the proxy, not us.
        key = (
            ex.path,
            ex.request_body,
            headers.get("authorization"),
            headers.get("pulze-labels"),
            headers.get("pulze-weights"),
            headers.get("pulze-policies"),
            fault == "retry",
            headers.get("x-sim-metadata"),
        )
        template = self._templates.get(key)
        req = None
        if template is None:
            req = self._prepare(headers, _parse_json(ex.request_body), chat)
            ex.stream = req.stream
        delay = (self.first_byte_delay or 0.5) if fault == "slow-first-byte" else self.first_byte_delay
        if delay:
            await asyncio.sleep(delay)
        created, cid = int(time.time() * 1000), ("chatcmpl-" if chat else "cmpl-") + ex.request_id[4:]
        if req is not None and req.stream:
            return await self._send_stream(ex, writer, keep_alive, coding, _events(req, cid, created, t0, fault))
        if template is None:
            if len(self._templates) >= 4096:
                self._templates.clear()
            template = self._templates[key] = _template(
                {
                    "id": _ID_SLOT,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": _CREATED_SLOT,
                    "model": req.namespace,
                    "choices": [
                        _choice(chat, i, " ".join(words), req.finish[i]) for i, words in enumerate(req.answers)
                    ],
                    **_usage_and_metadata(req, _LATENCY_SLOT, fault),
                }
            )
        body = template % (cid.encode(), b"%d" % created, repr(round(time.monotonic() - t0, 6)).encode())
        if self.record_exchanges:
            ex.response_json = json.loads(body)
        return await self._send(ex, writer, keep_alive, 200, body, coding=coding, truncate=fault == "truncate")

    # ----------------------------------------------------------------- Pulze semantics

    def _prepare(self, headers: dict[str, str], payload: dict[str, Any], chat: bool) -> _Completion:
        text, prompt_tokens = _prompt_of(payload, chat)
        plain = headers.get("x-sim-metadata", "").lower() == "none"
        requested = payload.get("model") or "pulze"
        if not isinstance(requested, str):
            raise _invalid(["body", "model"], "str type expected", "type_error.str")
        named = None if requested.lower() in ROUTER_MODELS else _ALIASES.get(requested.lower())
        if named is None and requested.lower() not in ROUTER_MODELS:
            raise _BadRequest(404, {"detail": f"The model '{requested}' is not available for this app"})
        n, max_tokens, temperature = payload.get("n"), payload.get("max_tokens"), payload.get("temperature", 1.0)
        n = 1 if n is None else n
        if not isinstance(n, int) or not 1 <= n <= 16:
            raise _invalid(["body", "n"], "ensure this value is between 1 and 16", "value_error.number")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise _invalid(["body", "max_tokens"], "ensure this value is greater than 0", "value_error.number")
        if temperature is not None and not isinstance(temperature, (int, float)):
            raise _invalid(["body", "temperature"], "value is not a valid float", "type_error.float")
        digest = _digest(text)
        ns, score, candidates, category = _route(digest, named)
        base = int.from_bytes(digest[:8], "big") + self.seed * 1_000_003 + _NAMESPACES.index(ns) * 104_729
        answers, finish = [], []
        for i in range(n):
            words = _words(base + i * 7919)
            cut = max_tokens is not None and max_tokens < len(words)
            answers.append(words[:max_tokens] if cut else words)
            finish.append("length" if cut else "stop")
        auth = headers.get("authorization", "")[7:].strip()
        return _Completion(
            chat,
            ns,
            prompt_tokens,
            answers,
            finish,
            score,
            candidates,
            category,
            temperature,
            max_tokens,
            _labels(headers),
            app_id_for(auth),
            payload.get("stream") is True,
            headers.get("x-sim-stream-usage", "").lower() != "none"
            and (not plain or _include_usage(payload.get("stream_options"))),
            plain,
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
        return await self._send(ex, writer, keep_alive, status, _dumps(body), "application/json", coding, extra)

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
        events: Iterator[tuple[bool, dict[str, Any]]],
    ) -> bool:
        """Write SSE over chunked encoding, one event per chunk, ``chunk_delay`` apart."""
        crlf = ex.request_headers.get("x-sim-sse", "").lower() == "crlf"
        end = b"\r\n\r\n" if crlf else b"\n\n"
        headers = [
            ("content-type", "text/event-stream; charset=utf-8"),
            ("transfer-encoding", "chunked"),
            ("cache-control", "no-cache"),
            ("x-request-id", ex.request_id),
            ("server", _SERVER),
        ]
        if coding:
            headers.append(("content-encoding", coding))
        if not keep_alive:
            headers.append(("connection", "close"))
        ex.status, ex.response_headers = 200, headers
        writer.write(_head(200, headers))
        encoder = _Encoder(coding) if coding else None
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
            for i, (final, event) in enumerate(events):
                if ex.fault == "truncate" and (i >= TRUNCATE_AFTER or final):
                    settle(False)
                    await writer.drain()
                    return False
                if i:
                    if self.chunk_delay:
                        await asyncio.sleep(self.chunk_delay)
                    if crlf:
                        writer.write(frame(b": keep-alive" + end))
                ex.stream_events.append(event)
                writer.write(frame(b"data: " + _dumps(event) + end))
                await writer.drain()
        except BaseException:  # the client left (or stop()): keep what was sent
            settle(False)
            raise
        done = frame(b"data: [DONE]" + end)
        tail = encoder.finish() if encoder else b""
        if tail:
            wire.append(tail)
            done += b"%x\r\n%b\r\n" % (len(tail), tail)
        settle(True)
        writer.write(done + b"0\r\n\r\n")
        await writer.drain()
        return keep_alive


def _route(digest: bytes, named: str | None) -> tuple[str, float, list[dict[str, float]], str]:
    """Score every model from the prompt hash; the router serves the best one, a named model itself."""
    scores = {ns: round(0.5 + digest[i] / 510, 4) for i, ns in enumerate(_NAMESPACES)}
    ns = named or max(_NAMESPACES, key=scores.__getitem__)
    ranked = [ns] if named else sorted(_NAMESPACES, key=scores.__getitem__, reverse=True)
    return ns, scores[ns], [{c: scores[c]} for c in ranked], _CATEGORIES[digest[-1] % len(_CATEGORIES)]


def _coding(headers: dict[str, str]) -> str | None:
    """The supported content-coding asked for by ``X-Sim-Encoding``, if any."""
    coding = headers.get("x-sim-encoding", "").lower()
    return coding if coding in ENCODINGS else None


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _parse_json(body: bytes) -> dict[str, Any]:
    """FastAPI-style 422s for bodies that are not a JSON object."""
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise _invalid(["body", getattr(exc, "pos", 0)], str(exc), "value_error.jsondecode") from None
    if not isinstance(payload, dict):
        raise _invalid(["body"], "value is not a valid dict", "type_error.dict")
    return payload


_ID_SLOT, _CREATED_SLOT, _LATENCY_SLOT = "\u2063id\u2063", -7_777_777_777_771, -7_777_777.125


def _template(body: dict[str, Any]) -> bytes:
    """Serialise a response once, with ``%s`` where the id, creation time and latency go."""
    raw = _dumps(body).replace(b"%", b"%%")
    for slot in (_dumps(_ID_SLOT), _dumps(_CREATED_SLOT), _dumps(_LATENCY_SLOT)):
        if slot in raw:
            raw = raw.replace(slot, b'"%s"' if slot.startswith(b'"') else b"%s", 1)
        else:  # no metadata (X-Sim-Metadata: none): the latency is formatted away
            raw += b"%.0s"
    return raw


def _include_usage(options: Any) -> bool:
    return isinstance(options, dict) and options.get("include_usage") is True


def _usage_and_metadata(req: _Completion, latency: float, fault: str | None) -> dict[str, Any]:
    """``usage`` and Pulze ``metadata``, shared by plain responses and the last stream chunk."""
    completion_tokens = sum(len(a) for a in req.answers)
    usage = {
        "prompt_tokens": req.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": req.prompt_tokens + completion_tokens,
    }
    if req.plain:
        return {"usage": usage}
    costs, savings = costs_for(req.namespace, req.prompt_tokens, completion_tokens)
    return {
        "usage": usage,
        "metadata": {
            "app_id": req.app_id,
            "model": dict(_MODEL_INFO[req.namespace]),
            "costs": costs,
            "cost_savings": savings,
            "latency": latency,
            "labels": req.labels,
            "score": req.score,
            "scores": {"best_models": [{req.namespace: req.score}], "candidates": req.candidates},
            "status_code": 200,
            "retries": 1 if fault == "retry" else 0,
            "warning": "Provider failed once; the request was retried (simulated)" if fault == "retry" else None,
            "error": None,
            "temperature": req.temperature,
            "max_tokens": req.max_tokens,
            "category": req.category,
            "extra": {},
        },
    }


def _choice(chat: bool, index: int, text: str, finish: str | None) -> dict[str, Any]:
    if chat:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "logprobs": None,
        }
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}


def _events(
    req: _Completion, cid: str, created: int, t0: float, fault: str | None
) -> Iterator[tuple[bool, dict[str, Any]]]:
    """Stream chunks ``(is_final, event)``: role deltas, one word per chunk, then usage + metadata.

    A generator, so the final metadata's latency is measured when the last chunk is due.
    """
    base = {
        "id": cid,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": created,
        "model": req.namespace,
    }
    if req.chat:
        for i in range(len(req.answers)):
            yield (
                False,
                {
                    **base,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                            "logprobs": None,
                        }
                    ],
                },
            )
    for j in range(max(len(a) for a in req.answers)):
        for i, words in enumerate(req.answers):
            if j < len(words):
                piece = words[j] if j == 0 else " " + words[j]
                choice = {"index": i, "delta": {"content": piece}} if req.chat else {"index": i, "text": piece}
                yield False, {**base, "choices": [{**choice, "finish_reason": None, "logprobs": None}]}
    last = {
        **base,
        "choices": [
            ({"index": i, "delta": {}} if req.chat else {"index": i, "text": ""})
            | {"finish_reason": f, "logprobs": None}
            for i, f in enumerate(req.finish)
        ],
    }
    if req.stream_usage:
        last.update(_usage_and_metadata(req, round(time.monotonic() - t0, 6), fault))
    yield True, last


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
