"""Test OTLP receivers on loopback, traces and logs: OTLP/HTTP (protobuf, optionally gzip) and OTLP/gRPC.

Both decode each export request with the official ``opentelemetry-proto`` messages and keep
the decoded spans and log records plus every request's (decompressed) protobuf bytes, so tests
can assert on attributes and also search the raw wire data for text that must never leave llmtap.

    with OTLPHTTPReceiver() as receiver:        # receiver.url = http://127.0.0.1:PORT
        ...export to receiver.traces_url...
        [span] = receiver.wait_spans(1)

Log export requests can be answered as a collector in trouble would: ``receiver.on_logs`` is
called with each request's decoded records before the answer and returns whether to acknowledge
it (HTTP 200 / gRPC OK) or refuse it (HTTP 503 / gRPC UNAVAILABLE; the records are still kept,
as a collector that took them but whose answer was lost). ``log_requests`` holds every request
with the answer it got, so tests can tell acknowledged copies from the rest.
"""

from __future__ import annotations

import gzip
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

TRACES_PATH = "/v1/traces"
LOGS_PATH = "/v1/logs"


@dataclass(frozen=True)
class ReceivedSpan:
    """One decoded span, ids as lower-case hex like the W3C header spells them."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    start_ns: int
    end_ns: int
    status_code: int  # Status.StatusCode: 0 unset, 1 ok, 2 error
    status_message: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str


@dataclass(frozen=True)
class ReceivedLog:
    """One decoded log record, ids as lower-case hex ("" when unset)."""

    event_name: str
    time_ns: int
    observed_ns: int
    trace_id: str
    span_id: str
    flags: int
    severity_number: int
    severity_text: str
    body: Any
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    scope_version: str


@dataclass(frozen=True)
class LogRequest:
    """One log export request and whether it was acknowledged."""

    records: list[ReceivedLog]
    acknowledged: bool


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return key_values(value.kvlist_value.values)
    return None if kind is None else getattr(value, kind)


def key_values(pairs: list[KeyValue]) -> dict[str, Any]:
    return {pair.key: any_value(pair.value) for pair in pairs}


def decode_spans(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = key_values(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=span.kind,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        status_code=span.status.code,
                        status_message=span.status.message,
                        attributes=key_values(span.attributes),
                        resource=resource,
                        scope=scope_spans.scope.name,
                    )
                )
    return spans


def decode_logs(request: logs_service_pb2.ExportLogsServiceRequest) -> list[ReceivedLog]:
    logs = []
    for resource_logs in request.resource_logs:
        resource = key_values(resource_logs.resource.attributes)
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                logs.append(
                    ReceivedLog(
                        event_name=record.event_name,
                        time_ns=record.time_unix_nano,
                        observed_ns=record.observed_time_unix_nano,
                        trace_id=record.trace_id.hex(),
                        span_id=record.span_id.hex(),
                        flags=record.flags,
                        severity_number=record.severity_number,
                        severity_text=record.severity_text,
                        body=any_value(record.body),
                        attributes=key_values(record.attributes),
                        resource=resource,
                        scope=scope_logs.scope.name,
                        scope_version=scope_logs.scope.version,
                    )
                )
    return logs


@dataclass
class _Store:
    """What a receiver got; shared by the HTTP and gRPC variants."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    log_requests: list[LogRequest] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)  # each request's protobuf bytes, decompressed
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_logs: Any = None  # called with a request's records; False refuses it

    def add(self, body: bytes) -> None:
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        with self.lock:
            self.raw.append(body)
            self.spans.extend(decode_spans(request))

    def add_logs(self, body: bytes) -> bool:
        """Keep the request's records; whether it is acknowledged (``on_logs`` decides)."""
        records = decode_logs(logs_service_pb2.ExportLogsServiceRequest.FromString(body))
        acknowledged = True if self.on_logs is None else bool(self.on_logs(records))
        with self.lock:
            self.raw.append(body)
            self.log_requests.append(LogRequest(records, acknowledged))
        return acknowledged


class _Receiver:
    def __init__(self) -> None:
        self.store = _Store()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self.store.lock:
            return list(self.store.spans)

    def raw_bytes(self) -> bytes:
        """Everything received so far, concatenated: for "this text never left" checks."""
        with self.store.lock:
            return b"".join(self.store.raw)

    @property
    def on_logs(self):
        return self.store.on_logs

    @on_logs.setter
    def on_logs(self, decide) -> None:
        self.store.on_logs = decide

    @property
    def log_requests(self) -> list[LogRequest]:
        with self.store.lock:
            return list(self.store.log_requests)

    @property
    def logs(self) -> list[ReceivedLog]:
        """Every log record received, acknowledged or not, in arrival order."""
        return [record for request in self.log_requests for record in request.records]

    @property
    def acknowledged_logs(self) -> list[ReceivedLog]:
        return [record for request in self.log_requests if request.acknowledged for record in request.records]

    def wait_logs(self, count: int, timeout: float = 15.0, *, acknowledged: bool = True) -> list[ReceivedLog]:
        """Wait until ``count`` records (by default: acknowledged ones) have arrived; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.acknowledged_logs if acknowledged else self.logs
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(got)} of {count} log records received within {timeout}s")
            time.sleep(0.02)

    def wait_spans(self, count: int, timeout: float = 10.0) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout
        while len(self.spans) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.spans)} of {count} spans received within {timeout}s")
            time.sleep(0.02)
        return self.spans

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class OTLPHTTPReceiver(_Receiver):
    """POST /v1/traces and /v1/logs with protobuf (``Content-Encoding: gzip`` accepted); other paths 404.

    ``port``: listen there (a collector coming back on the address llmtap was given), else a free one.
    """

    def __init__(self, port: int = 0) -> None:
        super().__init__()
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, headers) of every POST
        store, requests = self.store, self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                requests.append((self.path, dict(self.headers)))
                if self.path not in (TRACES_PATH, LOGS_PATH):
                    self.send_error(404)
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == LOGS_PATH:
                    if not store.add_logs(body):
                        self.send_error(503)
                        return
                    reply = logs_service_pb2.ExportLogsServiceResponse().SerializeToString()
                else:
                    store.add(body)
                    reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        """Base URL: what ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def traces_url(self) -> str:
        """Full signal URL: what ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``--otlp-endpoint`` take."""
        return self.url + TRACES_PATH

    @property
    def logs_url(self) -> str:
        """Full signal URL: what ``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`` takes."""
        return self.url + LOGS_PATH

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class OTLPGRPCReceiver(_Receiver):
    """The OTLP TraceService and LogsService over insecure gRPC; ``port`` as for HTTP."""

    def __init__(self, port: int = 0) -> None:
        super().__init__()
        store = self.store

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                store.add(request.SerializeToString())
                return trace_service_pb2.ExportTraceServiceResponse()

        class LogsService(logs_service_pb2_grpc.LogsServiceServicer):
            def Export(self, request, context):
                if not store.add_logs(request.SerializeToString()):
                    context.abort(grpc.StatusCode.UNAVAILABLE, "refused by the test")
                return logs_service_pb2.ExportLogsServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self._server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(LogsService(), self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=None)
