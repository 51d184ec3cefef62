"""The mitmproxy addon: watches completion exchanges and hands one record per exchange to sinks.

It never changes what the app and upstream exchange, with two opt-in exceptions:
``--propagate`` adds a ``traceparent`` header, and ``--inject-stream-usage`` adds
``stream_options.include_usage`` to streaming chat requests that lack it. Streams are
forwarded chunk by chunk through ``StreamTee``, which returns each chunk untouched and reads a copy. Every fault of llmtap's
own is caught, counted in ``Health`` and logged once: the exchange always goes on.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import random
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, http
from mitmproxy import flow as mitmproxy_flow

from llmtap import __version__
from llmtap.capture.bodies import INLINE_BYTES, Body, needs_thread, read_body
from llmtap.capture.decoding import bounded_decoder
from llmtap.capture.headers import SHUTDOWN_MESSAGE, error_type, header_map, key_fingerprint, trace_id_of
from llmtap.capture.intercept import apply_intercept_hosts, intercept_summary
from llmtap.config import OPTIONS, Settings, SettingsError
from llmtap.health import Health
from llmtap.pricing.cost import Pricer, PricesFileError, resolve_cost
from llmtap.protocols import registry
from llmtap.protocols.base import Family, StreamParser
from llmtap.protocols.chat_completions import with_stream_usage
from llmtap.protocols.errors import redact
from llmtap.protocols.secrets import credentials, scrub_record
from llmtap.protocols.values import load_json
from llmtap.record import RECORD_SCHEMA, ExchangeRecord
from llmtap.sinks import Sink

log = logging.getLogger("llmtap")

_METADATA_KEY = "llmtap"
#: Background responses awaiting the poll that bills them (ids; oldest forgotten first). A poll
#: for an id not here passes through: so each is billed once, by this process (see README).
PENDING_LIMIT = 10_000


class StreamTee:
    """``flow.response.stream`` callable: returns every chunk as-is, parses a copy.

    Chunks are content-decoded here, in bounded pieces (``llmtap.capture.decoding``), and fed
    to the family's stream parser. The record is finished as soon as the parser says the client
    has everything (``data: [DONE]`` for Chat Completions), before that chunk is returned:
    clients such as the openai SDK stop reading there. Parsing problems switch parsing off for
    the rest of the stream (counted once); so does the scan bound (``--parse-scan-bytes``
    decoded bytes, against decompression bombs): the chunks keep flowing either way.
    """

    __slots__ = ("_decoder", "_scan_left", "exchange", "health", "on_done", "parser")

    def __init__(
        self,
        exchange: Exchange,
        parser: StreamParser,
        content_encoding: str | None,
        health: Health,
        on_done: Callable[[], None],
        scan_bytes: int = 64 << 20,
    ) -> None:
        self.exchange = exchange
        self.parser = parser
        self.health = health
        self.on_done = on_done
        self._decoder = bounded_decoder(content_encoding)
        self._scan_left = scan_bytes
        if self._decoder is None:
            exchange.parse_problem = f"unsupported content-encoding {content_encoding!r}"

    def __call__(self, chunk: bytes) -> bytes:
        if self._decoder is not None:
            try:
                self._read(chunk)
            except Exception as exc:  # fail open: stop parsing, keep forwarding
                self._decoder = None
                self.exchange.parse_problem = f"stream parse failed: {type(exc).__name__}"
                self.health.error("parse_stream", exc, self.exchange.path)
        return chunk

    def _read(self, chunk: bytes) -> None:
        parser = self.parser
        if chunk:
            self._decoder.feed(chunk, self._piece)
        else:  # the body ended: what the decoder still holds, then the parser's last event
            if self._decoder.finish(self._piece) and not parser.done and parser.close():
                self._first_token()
        if parser.done:
            self._decoder = None  # the record is complete: the rest only passes through
            self.on_done()

    def _piece(self, piece: bytes) -> bool:
        """One decoded piece to the parser; False stops decoding (done, or the scan bound)."""
        parser = self.parser
        if len(piece) > self._scan_left:
            self._decoder = None
            self.exchange.parse_problem = "scan bound: stream parsing stopped after --parse-scan-bytes"
            self.health.error("parse_bound", ValueError(self.exchange.parse_problem), self.exchange.path)
            return False
        self._scan_left -= len(piece)
        if parser.feed(piece):
            self._first_token()
        return not parser.done

    def _first_token(self) -> None:
        if self.exchange.first_token_at is None:
            self.exchange.first_token_at = time.time()


class Exchange:
    """What is known about one exchange while it is in flight (lives in ``flow.metadata``)."""

    __slots__ = (
        "body",
        "family",
        "fields",
        "finished",
        "first_token_at",
        "operation",
        "parse_problem",
        "path",
        "poll_id",
        "stream",
    )

    def __init__(self, family: Family, operation: str, path: str, fields: dict[str, Any]) -> None:
        self.family = family
        self.operation = operation
        self.path = path
        self.fields = fields
        self.stream: StreamParser | None = None
        self.first_token_at: float | None = None
        self.parse_problem: str | None = None
        self.body: Body | None = None  # a non-streamed body read off the loop
        self.finished = False
        self.poll_id: str | None = None  # a poll for a pending background exchange's result


class LLMTap:
    """mitmproxy addon. Sinks are built when the proxy starts and closed when it stops."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.instance: str | None = None
        self.health = Health()
        self.prices = Pricer.load()
        self.sinks: list[Sink] = []
        self.family_map: registry.FamilyMap = ()
        self.pending: dict[str, str | None] = {}  # background response id -> its request model
        self.sink_problems: dict[str, str] = {}  # sinks that could not start: why (for the banner)
        self.open_flows: dict[str, http.HTTPFlow] = {}  # exchanges started and not yet recorded
        self._running = False

    # --- options -------------------------------------------------------------------------
    def load(self, loader) -> None:
        for option in OPTIONS:
            loader.add_option(option.name, option.typespec, option.default, option.help, option.choices or None)

    def configure(self, updated: set[str]) -> None:
        if not any(name.startswith("llmtap_") for name in updated):
            return
        from mitmproxy.exceptions import OptionsError

        try:
            settings = Settings.from_options(ctx.options)
        except SettingsError as exc:
            raise OptionsError(str(exc)) from exc
        try:
            family_map = registry.family_map(settings.family_map)
        except ValueError as exc:
            raise OptionsError(str(exc)) from exc
        try:
            prices = Pricer.load(settings.prices or None, settings.price_data or None)
        except PricesFileError as exc:  # names the file, the model and the field
            raise OptionsError(f"llmtap_prices (--prices): {exc}") from exc
        except (OSError, ValueError) as exc:
            raise OptionsError(
                f"llmtap_price_data (--price-data): cannot use {settings.price_data!r}: {exc}; expected genai-prices' "
                "own data file (its prices/data.json)"
            ) from exc
        changed = settings != self.settings
        self.settings, self.prices, self.family_map = settings, prices, family_map
        # a fleet's rows say which sidecar saw them: the host name unless --instance names it
        self.instance = settings.instance or (socket.gethostname() if settings.db_is_server else None)
        if self._running and changed:
            # An operator changed llmtap options at runtime (e.g. ``:set`` in mitmproxy's console).
            # The old sinks are flushed and closed first, on the loop: the audit journal is locked
            # by one sink at a time, and closing in the background would drop records in between.
            self._close_sinks(self.sinks)
            self.sinks = self._build_sinks()

    def running(self) -> None:
        if not self._running:
            self._running = True
            apply_intercept_hosts(ctx.options, self.settings)
            self.sinks = self._build_sinks()
            self._print_banner()

    def done(self) -> None:
        self.finish_open_flows()
        self._close_sinks(self.sinks)
        self.sinks = []
        self._running = False

    def _build_sinks(self) -> list[Sink]:
        """Audit first: its journal append must happen before anything else can fail.

        With the audit log on, its writer process also exports the spans (from the journal),
        so that neither SQLite nor span building takes CPU from the proxy; without it, spans
        are built on a thread of this process.

        A sink that cannot start (bad path, port taken) is counted and logged, and the proxy
        runs without it: traffic is never refused because of llmtap.
        """
        settings = self.settings
        wanted = [
            ("audit", bool(settings.db), "llmtap.sinks.audit", "AuditSink"),
            ("jsonl", bool(settings.jsonl), "llmtap.sinks.jsonl", "JsonlSink"),
            ("metrics", settings.metrics_port >= 0, "llmtap.sinks.metrics", "MetricsSink"),
            ("spans", settings.otlp_configured, "llmtap.sinks.spans", "SpanSink"),
        ]
        sinks: list[Sink] = []
        self.sink_problems = {}
        for name, enabled, module, cls in wanted:
            if not enabled or (name == "spans" and any(sink.name == "audit" for sink in sinks)):
                continue
            try:
                sinks.append(getattr(importlib.import_module(module), cls)(settings, self.health))
            except Exception as exc:
                self.health.error(f"start_{name}", exc, "sink disabled")
                self.sink_problems[name] = f"{type(exc).__name__}: {exc}"
        return sinks

    def _print_banner(self) -> None:
        """One short banner on stderr: what to give the app, and where everything goes."""
        proxyserver = ctx.master.addons.get("proxyserver")
        addrs = proxyserver.listen_addrs() if proxyserver else []
        host, port = (
            (addrs[0][0], addrs[0][1]) if addrs else (ctx.options.listen_host or "127.0.0.1", ctx.options.listen_port)
        )
        host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        mode = ctx.options.mode[0] if ctx.options.mode else "regular"
        if mode.startswith("reverse:"):
            app = f"OPENAI_BASE_URL=http://{host}:{port}/v1   (upstream {mode.removeprefix('reverse:')})"
        elif mode == "transparent":
            app = f"traffic redirected to {host}:{port} by the OS   (for TLS, trust {ctx.options.confdir}/mitmproxy-ca-cert.pem)"
        else:
            app = f"HTTPS_PROXY=http://{host}:{port}   (trust {ctx.options.confdir}/mitmproxy-ca-cert.pem)"
        metrics = next((s for s in self.sinks if s.name == "metrics"), None)
        lines = [f"llmtap {__version__} listening: {app}"]
        if metrics is not None:
            lines.append(f"  metrics  http://{self.settings.metrics_host}:{metrics.port}/metrics")
        elif self.settings.metrics_port >= 0:  # the sink could not start: usually the port is taken
            lines.append(
                f"  metrics  NOT served: {self.settings.metrics_host}:{self.settings.metrics_port} failed (see above); "
                "choose another port with --metrics-port (0 picks a free one)"
            )
        if not self.settings.db:
            lines.append("  audit    off")
        elif any(s.name == "audit" for s in self.sinks):
            lines.append(f"  audit    {self.settings.db_display}")
        else:  # e.g. another llmtap writes it: this one must not claim it
            lines.append(f"  audit    NOT WRITTEN ({self.sink_problems.get('audit', 'failed to start')})")
        if self.settings.jsonl:
            lines.append(f"  jsonl    {self.settings.jsonl}")
        if not mode.startswith("reverse:"):
            lines.append(f"  decrypts {intercept_summary(ctx.options)}")
        lines.append(f"  spans    {'OTLP on' if self.settings.otlp_configured else 'off (no OTLP endpoint)'}")
        if self.settings.otlp_logs:
            lines.append("  logs     OTLP log record per audit row (at least once)")
        lines.append(f"  content  {'CAPTURED (opt-in)' if self.settings.capture_content else 'not captured'}")
        print("\n".join(lines), file=sys.stderr, flush=True)

    def finish_open_flows(self) -> None:
        """The proxy is stopping: record every exchange still open, with what arrived so far."""
        for flow in list(self.open_flows.values()):
            if flow.error is None:
                flow.error = mitmproxy_flow.Error(SHUTDOWN_MESSAGE)
            self._finish(flow)

    def _close_sinks(self, sinks: list[Sink]) -> None:
        for sink in sinks:
            try:
                sink.close()
            except Exception as exc:
                self.health.error(f"close_{sink.name}", exc)

    # --- hooks -----------------------------------------------------------------------------
    def request(self, flow: http.HTTPFlow) -> None:
        method, target = flow.request.method, flow.request.path  # each read decodes the bytes anew
        path, _, query = target.partition("?")  # a query string may hold a key: never recorded
        found = registry.find(method, path.rstrip("/"), flow.request.host, self.family_map)
        if found is None:
            self._passthrough(method)
            return
        family, operation = found
        poll_id = family.poll_id(method, path.rstrip("/")) if method == "GET" else None
        if poll_id is not None and poll_id not in self.pending:
            self._passthrough(method)  # nothing pending under this id: billed already, or never ours
            return
        try:
            exchange = Exchange(family, operation, path, self._request_fields(flow, family, operation, path, query))
        except Exception as exc:  # fail open: the exchange goes on, recorded from what we can
            self.health.error("parse_request", exc, path)
            exchange = Exchange(family, operation, path, {"request_start": flow.request.timestamp_start})
            exchange.parse_problem = f"request parse failed: {type(exc).__name__}"
        if poll_id is not None:
            exchange.poll_id = poll_id
            exchange.fields["request_model"] = self.pending[poll_id]  # a GET has no body to say it
        flow.metadata[_METADATA_KEY] = exchange
        self.open_flows[flow.id] = flow
        self.health.in_flight += 1
        if self.settings.inject_stream_usage and family.name == "chat_completions" and operation == "chat":
            self._inject_stream_usage(flow, path)
        if self.settings.propagate and exchange.fields.get("span_id"):
            incoming = exchange.fields.get("traceparent")
            flags = incoming.strip()[-2:] if incoming else "01"  # keep the app's sampling decision
            flow.request.headers["traceparent"] = (
                f"00-{exchange.fields['trace_id']}-{exchange.fields['span_id']}-{flags}"
            )

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange = flow.metadata.get(_METADATA_KEY)
        if exchange is None or flow.response is None:
            return
        headers = header_map(flow.response.headers)
        content_type = headers.get("content-type", "")
        if exchange.family.streams(exchange.path, content_type):
            try:
                parser = exchange.family.stream_parser(self.settings.content_cap, content_type)
                parser.bound(self.settings.parse_memory_bytes)
                tee = StreamTee(
                    exchange,
                    parser,
                    headers.get("content-encoding"),
                    self.health,
                    lambda: self._finish(flow),
                    self.settings.parse_scan_bytes,
                )
            except Exception as exc:  # fail open: without a tee mitmproxy buffers, but delivers
                self.health.error("stream_setup", exc, exchange.path)
                return
            exchange.stream = parser
            flow.response.stream = tee

    def response(self, flow: http.HTTPFlow) -> Any:
        exchange = flow.metadata.get(_METADATA_KEY)
        response = flow.response
        if (
            exchange is not None
            and exchange.stream is None
            and not exchange.finished
            and response is not None
            and response.raw_content
            and needs_thread(response.raw_content, response.headers.get("content-encoding"))
        ):
            return self._finish_off_loop(flow, exchange)  # mitmproxy awaits it: only this flow waits
        self._finish(flow)
        return None

    async def _finish_off_loop(self, flow: http.HTTPFlow, exchange: Exchange) -> None:
        """Read a large or content-encoded body in a worker thread (bounded work, but not
        microseconds), then finish on the loop; the response goes to the client after that, so
        its record is journaled first as always."""
        response = flow.response
        try:
            exchange.body = await asyncio.to_thread(
                read_body,
                response.raw_content,
                response.headers.get("content-encoding"),
                self.settings.parse_memory_bytes,
                self.settings.parse_scan_bytes,
            )
        except Exception as exc:  # fail open: _finish reads it on the loop, still bounded
            self.health.error("parse_response", exc, exchange.path)
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    # --- internals ---------------------------------------------------------------------------
    def _passthrough(self, method: str) -> None:
        for sink in self.sinks:
            passthrough = getattr(sink, "passthrough", None)
            if passthrough is not None:
                try:
                    passthrough(method)
                except Exception as exc:  # fail open
                    self.health.error(sink.name, exc, "passthrough")

    def _inject_stream_usage(self, flow: http.HTTPFlow, path: str) -> None:
        """``--inject-stream-usage``, the one body change llmtap may make (opt-in)."""
        try:
            content = with_stream_usage(flow.request.get_content(strict=False))
            if content is not None:
                flow.request.content = content  # re-encoded and re-measured by mitmproxy
        except Exception as exc:  # fail open: the request goes as the app sent it
            self.health.error("inject_stream_usage", exc, path)

    def _request_fields(
        self, flow: http.HTTPFlow, family: Family, operation: str, path: str, query: str
    ) -> dict[str, Any]:
        request = flow.request
        headers = header_map(request.headers)
        content = request.raw_content or b""
        if "content-encoding" in headers or len(content) > INLINE_BYTES:  # bounded, as response bodies
            settings = self.settings
            body = read_body(
                content, headers.get("content-encoding"), settings.parse_memory_bytes, settings.parse_scan_bytes
            )
            parsed = body.value
        else:
            parsed = load_json(content)
        fields = family.request_fields(parsed, operation, path, query, self.settings.content_cap)
        fields.update(family.header_fields(headers))
        fields.update(registry.request_header_fields(headers))
        traceparent = headers.get("traceparent")
        incoming_trace = trace_id_of(traceparent)
        fields.update(
            request_start=request.timestamp_start,
            request_end=request.timestamp_end,
            client_address=flow.client_conn.peername[0] if flow.client_conn.peername else None,
            instance=self.instance,
            upstream_scheme=request.scheme,
            upstream_host=request.host,
            upstream_port=request.port,
            key_fingerprint=key_fingerprint(headers, self.settings.key_salt, query),
            _secrets=credentials(headers, "?" + query),  # removed from the record when it is built
            traceparent=traceparent if incoming_trace else None,
            trace_id=incoming_trace or f"{random.getrandbits(128) or 1:032x}",
            span_id=f"{random.getrandbits(64) or 1:016x}",
        )
        return fields

    def _finish(self, flow: http.HTTPFlow) -> None:
        exchange: Exchange | None = flow.metadata.get(_METADATA_KEY)
        if exchange is None or exchange.finished:
            return
        exchange.finished = True
        self.open_flows.pop(flow.id, None)
        self.health.in_flight -= 1
        try:
            record = self._build_record(flow, exchange)
        except Exception as exc:  # a record must exist even when building it failed
            self.health.error("build_record", exc, exchange.path)
            record = ExchangeRecord(
                exchange_id=flow.id,
                operation=exchange.operation,
                family=exchange.family.name,
                method=flow.request.method,
                path=exchange.path,
                request_start=flow.request.timestamp_start,
                response_end=time.time(),
                http_status=flow.response.status_code if flow.response else None,
                error_type="llmtap_parse_error",
                error_message=f"{type(exc).__name__}: {exc}"[:300],
                record_schema=RECORD_SCHEMA,
            )
        record = scrub_record(record, exchange.fields.get("_secrets"))
        if not self._background(exchange, record):
            self._passthrough(record.method)
            return
        for sink in self.sinks:
            try:
                sink.emit(record)
            except Exception as exc:  # fail open: one sink's fault touches neither the flow nor other sinks
                self.health.error(sink.name, exc, exchange.path)

    def _background(self, exchange: Exchange, record: ExchangeRecord) -> bool:
        """Track background responses; False for a poll that bills nothing (it passes through).

        A record saying a response is still queued or in progress makes its id pending; the
        first poll that finds it finished is recorded (it holds the usage) and clears the id.
        """
        if exchange.poll_id is not None:
            if record.response_status in (None, "queued", "in_progress") or exchange.poll_id not in self.pending:
                return False
            del self.pending[exchange.poll_id]
            return True
        if record.background and record.response_status in ("queued", "in_progress") and record.response_id:
            if len(self.pending) >= PENDING_LIMIT:
                del self.pending[next(iter(self.pending))]
            self.pending[record.response_id] = record.request_model
        return True

    def _build_record(self, flow: http.HTTPFlow, exchange: Exchange) -> ExchangeRecord:
        fields = exchange.fields  # finished exactly once: built up in place, no copy
        response = flow.response
        capture = self.settings.content_cap
        family = exchange.family
        body = None
        if exchange.stream is not None:
            fields.update(exchange.stream.fields())
            fields["stream"] = True
            body = exchange.stream.overlay_body()
            if exchange.stream.overflows and exchange.parse_problem is None:
                exchange.parse_problem = "stream line or event above --parse-memory-bytes dropped"
            if exchange.stream.problem and exchange.parse_problem is None:
                exchange.parse_problem = exchange.stream.problem
        elif response is not None and response.raw_content is not None:
            read = exchange.body or read_body(
                response.raw_content,
                response.headers.get("content-encoding"),
                self.settings.parse_memory_bytes,
                self.settings.parse_scan_bytes,
            )
            body, raw = read.value, read.head
            if read.problem:
                exchange.parse_problem = read.problem
            if 200 <= response.status_code < 300:
                if body is None and raw and exchange.parse_problem is None:
                    exchange.parse_problem = "response body is not JSON"
                fields.update(family.response_fields(body, capture))
            else:  # errors may still carry a router's extras (Pulze metadata): the overlays see them
                fields.update(family.error_fields(body, raw))
        if response is not None:
            fields.update(
                http_status=response.status_code,
                response_start=response.timestamp_start,
                response_end=response.timestamp_end or time.time(),
            )
        else:
            fields["response_end"] = time.time()
        fields["first_token_at"] = exchange.first_token_at
        # the transport's verdict first; else what the family read (an error event in a 200 stream)
        fields["error_type"] = error_type(flow) or fields.get("error_type")
        if flow.error is not None:
            fields["error_message"] = redact(flow.error.msg[:300])
        elif exchange.parse_problem and fields["error_type"] is None:
            self.health.error("parse_response", ValueError(exchange.parse_problem), exchange.path)
        fields["parse_problem"] = exchange.parse_problem
        registry.finish(fields, family, body, capture is not None)
        fields.update(resolve_cost(fields, self.prices, self.settings))
        if fields.get("background") and fields.get("response_status") in ("queued", "in_progress"):
            fields["cost_source"] = "deferred"  # billed by the poll that finds it finished
        fields.update(
            exchange_id=flow.id,
            operation=exchange.operation,
            family=family.name,
            method=flow.request.method,
            path=exchange.path,
            record_schema=RECORD_SCHEMA,
        )
        return ExchangeRecord.from_fields(fields)  # leaves out parsers' intermediates (reported_cost_usd)
