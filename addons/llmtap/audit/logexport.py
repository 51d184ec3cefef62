"""Audit rows as OpenTelemetry log records over OTLP, delivered at least once.

For fleets that already run an OpenTelemetry Collector (to ClickHouse, Loki, Kafka, a
warehouse): each row of the audit log becomes one log record, so the fleet's own pipeline can
be the central copy of the books. Turned on by ``--otlp-logs``; configured by the standard
``OTEL_EXPORTER_OTLP_[LOGS_]{ENDPOINT,PROTOCOL,HEADERS,COMPRESSION,TIMEOUT,CERTIFICATE,...}``
variables (``http/protobuf``, the default, or ``grpc``), which the SDK's exporters read.

One record per row (``log_record``): event name ``llmtap.exchange``; every column of the
``exchanges`` row that is not NULL as an attribute ``llmtap.<column>`` with its stored value
(INTEGER as int, REAL as double, TEXT as string, the JSON columns as their JSON text), except
the store's own row number and the raw provider metadata (``metadata_json``; what is worth
querying in it is a column already). ``llmtap.exchange_id`` is the key to deduplicate on
downstream. Trace and span ids are the row's; the timestamp is the request's start. Prompt and
completion text go out only with ``--capture-content`` (``llmtap.input_messages``,
``llmtap.output_messages``, ``llmtap.content_truncated``, as stored). The API key is never in a
row, so never in a record: only its keyed fingerprint.

Delivery (``LogExport``): a thread of the writer process, never the proxy, reads the rows
after this instance's cursor from the store, oldest first and at most
``OTEL_BLRP_MAX_EXPORT_BATCH_SIZE`` (512) at a time, calls the OTLP exporter's ``export()``
itself and waits for its answer, and only when the collector acknowledged the request moves
the cursor (a row in the store, ``log_export``) past the last row sent. So a crash, a kill -9
or a collector outage can make a record go twice, never zero times; while the collector is
down the thread backs off (0.1 s doubling to the writer's cap) and retries from the cursor;
rows wait in the store, and retention does not delete a row before it was acknowledged.
Nothing here runs on the writer's commit path: the writer only wakes the thread.

Failure policy: a failed export is counted (``llmtap_internal_errors_total{stage="log_export"}``)
and logged once per kind; ``log_export_backlog`` (a gauge) is the number of rows committed and
not yet acknowledged. A batch that fails is retried at half its size, down to one record, so one
record the collector refuses for good holds up only itself and the rows after it, visibly.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Protocol

from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.context import Context
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.environment_variables import (
    OTEL_BLRP_MAX_EXPORT_BATCH_SIZE,
    OTEL_EXPORTER_OTLP_LOGS_PROTOCOL,
    OTEL_EXPORTER_OTLP_LOGS_TIMEOUT,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TIMEOUT,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from llmtap import __version__
from llmtap.audit.control import next_backoff
from llmtap.audit.rows import as_hex
from llmtap.config import Settings
from llmtap.health import Health
from llmtap.record import canonical_json
from llmtap.tracing import _hex_id, _quiet_repeats, make_resource

EVENT_NAME = "llmtap.exchange"
PREFIX = "llmtap."
#: Columns not sent: the store's own row number and the raw provider metadata.
NOT_EXPORTED = frozenset({"id", "metadata_json"})
#: The chain's hashes, sent as shown everywhere (``sha256:<hex>``), whichever format stored them.
CHAIN_COLUMNS = frozenset({"prev_hash", "row_hash"})
#: Seconds an export may take, retries included, unless OTEL_EXPORTER_OTLP_[LOGS_]TIMEOUT says.
EXPORT_TIMEOUT_S = 5.0
#: The SDK's default for OTEL_BLRP_MAX_EXPORT_BATCH_SIZE.
DEFAULT_BATCH = 512
#: How long ``close`` keeps sending what is left before the writer exits (the rest goes next start).
CLOSE_SECONDS = 3.0
#: With nothing new committed, the thread still looks this often (a missed wake-up costs no more).
IDLE_SECONDS = 1.0
#: How often the backlog gauge is recounted from the store.
COUNT_SECONDS = 1.0


class ExportStore(Protocol):
    """What the export needs of the audit store (``llmtap.audit.sqlite.AuditStore``): the cursor
    is the store's for its own instance (its rows, its chain)."""

    def log_export_position(self) -> tuple[int, int]: ...

    def rows_after(
        self, row_id: int, limit: int, *, content: bool
    ) -> list[tuple[dict[str, Any], dict[str, Any] | None]]: ...

    def advance_log_export(self, last_id: int) -> None: ...

    def close(self) -> None: ...


class NotAcknowledged(Exception):
    """The exporter reported a failure: the collector did not acknowledge the batch."""


def log_attributes(row: Mapping[str, Any], content: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The record's attributes: each non-NULL exported column, and the content when given."""
    attributes = {
        PREFIX + name: as_hex(value) if name in CHAIN_COLUMNS else _attribute_value(value)
        for name, value in row.items()
        if value is not None and name not in NOT_EXPORTED
    }
    if content is not None:
        for name in ("input_messages", "output_messages"):
            if content.get(name) is not None:
                attributes[PREFIX + name] = _attribute_value(content[name])
        attributes[PREFIX + "content_truncated"] = bool(content.get("truncated"))
    return attributes


def _attribute_value(value: Any) -> Any:
    """A stored value as an OTLP attribute value: SQLite gives int, float, str (or bytes); an
    exact decimal or a timestamp of another engine goes as its text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, (dict, list)):  # a JSON column another engine parses: the text SQLite keeps
        return canonical_json(value)
    return str(value)  # Decimal: its exact text


def log_record(
    row: Mapping[str, Any],
    content: Mapping[str, Any] | None,
    resource: Resource,
    scope: InstrumentationScope,
) -> ReadableLogRecord:
    """One row as one OTLP log record (see the module docstring). The same row always gives the
    same record, so a resent record equals the first copy."""
    trace_id, span_id = _hex_id(row.get("trace_id"), 32), _hex_id(row.get("span_id"), 16)
    context = Context()
    if trace_id and span_id:
        span = SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(_flags(row.get("traceparent"))))
        context = set_span_in_context(NonRecordingSpan(span), context)
    failed = row.get("error_type") is not None
    start = _ns(row.get("request_start"))
    end = _ns(row.get("response_end")) or _ns(row.get("request_end")) or start
    record = LogRecord(
        timestamp=start,
        observed_timestamp=end or time.time_ns(),
        context=context,
        severity_number=SeverityNumber.WARN if failed else SeverityNumber.INFO,
        severity_text="WARN" if failed else "INFO",
        body=summary(row),
        attributes=log_attributes(row, content),
        event_name=EVENT_NAME,
    )
    # a plain dict of attributes: not cut to the SDK's default limit of 128
    return ReadableLogRecord(log_record=record, resource=resource, instrumentation_scope=scope)


def summary(row: Mapping[str, Any]) -> str:
    """The record's body, one line for people reading a log view: what, which model, the outcome."""
    model = row.get("response_model") or row.get("request_model") or "-"
    outcome = row.get("error_type") or row.get("http_status") or "-"
    cost = row.get("cost_usd")
    money = f"${cost:.6f}" if isinstance(cost, (int, float, Decimal)) else "cost unknown"
    return f"{row.get('operation')} {model} {outcome} {money}"


def _flags(traceparent: Any) -> int:
    """The app's sampled flag from its traceparent, when it sent a valid one; else 0."""
    if isinstance(traceparent, str) and len(traceparent) == 55:
        try:
            return int(traceparent[-2:], 16) & 0x01
        except ValueError:
            return 0
    return 0


def _ns(seconds: Any) -> int | None:
    if isinstance(seconds, (int, float)) and seconds == seconds and 0 <= seconds < 1e11:
        return round(seconds * 1e9)
    return None


def make_log_exporter() -> LogRecordExporter:
    """The OTLP log exporter for ``OTEL_EXPORTER_OTLP_[LOGS_]PROTOCOL``; the SDK reads the rest
    (``OTEL_EXPORTER_OTLP_ENDPOINT`` is a base: ``/v1/logs`` is appended for http;
    ``..._LOGS_ENDPOINT`` is used as it is)."""
    protocol = (
        (os.environ.get(OTEL_EXPORTER_OTLP_LOGS_PROTOCOL) or os.environ.get(OTEL_EXPORTER_OTLP_PROTOCOL) or "")
        .strip()
        .lower()
    ) or "http/protobuf"
    configured = os.environ.get(OTEL_EXPORTER_OTLP_LOGS_TIMEOUT) or os.environ.get(OTEL_EXPORTER_OTLP_TIMEOUT)
    timeout = None if configured else EXPORT_TIMEOUT_S
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HTTPExporter

        return HTTPExporter(timeout=timeout)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GRPCExporter

        return GRPCExporter(timeout=timeout)
    raise ValueError(f"unsupported OTLP protocol {protocol!r}: use 'http/protobuf' or 'grpc'")


def batch_size() -> int:
    try:
        return max(1, int(os.environ[OTEL_BLRP_MAX_EXPORT_BATCH_SIZE]))
    except (KeyError, ValueError):
        return DEFAULT_BATCH


class LogExport:
    """The export thread of the writer process (see the module docstring).

    ``open_store`` gives the thread its own connection to the store (SQLite connections stay
    in the thread that made them); it is first called after the writer's first ``notify``, once
    the writer has opened and migrated the store. ``close`` returns within ``timeout`` plus
    about 1.5 s; an export still in flight then is abandoned (its rows go again next start).
    """

    def __init__(
        self,
        settings: Settings,
        health: Health,
        open_store: Callable[[], ExportStore],
        *,
        max_backoff: float = 5.0,
        start: bool = True,
    ) -> None:
        self.health = health
        self.content = settings.capture_content
        self.max_backoff = max_backoff
        self.limit = batch_size()
        self._size = self.limit  # halved after a failure, back to the limit after a success
        self._open_store = open_store
        self._store: ExportStore | None = None
        self._exporter = make_log_exporter()
        self._log_filters = _quiet_repeats(self._exporter)
        self._resource = make_resource()
        self._scope = InstrumentationScope("llmtap", __version__)
        self.backlog = 0  # rows committed and not yet acknowledged, as last counted
        self._cursor: int | None = None  # the last row id acknowledged, as this thread knows it
        self._counted = 0.0
        self.acked = 0  # records the collector acknowledged since this process started
        self._wake = threading.Event()
        self._started = threading.Event()
        self._closing = threading.Event()
        self._deadline = float("inf")
        health.gauges["log_export_backlog"] = lambda: self.backlog
        self._thread = None
        if start:  # else ``export_once`` is called by hand (tests)
            self._thread = threading.Thread(target=self._run, name="llmtap-log-export", daemon=True)
            self._thread.start()

    def notify(self) -> None:
        """Rows were committed (or the store just opened): look now."""
        self._started.set()
        self._wake.set()

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """Send what is left (retrying) for up to ``timeout`` seconds, then stop; the rest goes next start."""
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        self._started.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout + 0.5)
        self._exporter.shutdown()  # also cuts an export still retrying against a dead collector
        if self._thread is not None:
            self._thread.join(1.0)
        else:
            self._close_store()
        self.health.gauges.pop("log_export_backlog", None)
        for logger, log_filter in self._log_filters:
            logger.removeFilter(log_filter)

    def _run(self) -> None:
        self._started.wait()
        delay = 0.0
        try:
            while True:
                self._wake.clear()
                sent, failed = 0, False
                try:
                    sent = self.export_once()
                    delay = 0.0
                except Exception as exc:  # collector down, store locked, a bug: retry, lose nothing
                    if not isinstance(exc, NotAcknowledged):
                        self._close_store()
                    self.health.error("log_export", exc, "records wait in the audit log and are resent")
                    delay, failed = next_backoff(delay, self.max_backoff), True
                if self._closing.is_set():  # send what is left, retrying, until the deadline
                    left = self._deadline - time.monotonic()
                    if left <= 0 or not (sent or failed):
                        return
                    if failed:
                        time.sleep(min(delay, left))
                elif not sent:
                    self._wake.wait(delay or IDLE_SECONDS)
        finally:
            self._close_store()

    def export_once(self) -> int:
        """Export the next batch after the cursor; the number acknowledged (0: nothing was waiting).

        Raises ``NotAcknowledged`` when the collector did not take it, or the store's error.
        The cursor is read from the store when the store is opened and kept here meanwhile (this
        thread alone moves it); the backlog is counted at most once a second, as counting is
        proportional to it.
        """
        if self._store is None:
            self._store = self._open_store()
            self._cursor = None
        now = time.monotonic()
        if self._cursor is None or now - self._counted >= COUNT_SECONDS:
            self._cursor, self.backlog = self._store.log_export_position()
            self._counted = now
        rows = self._store.rows_after(self._cursor, self._size, content=self.content)
        if not rows:
            self.backlog = 0
            return 0
        batch = [log_record(row, text, self._resource, self._scope) for row, text in rows]
        try:
            result = self._exporter.export(batch)
        except Exception as exc:  # the exporter's own fault: same as a refusal
            raise NotAcknowledged(f"{len(batch)} log records: {type(exc).__name__}: {exc}") from exc
        if result is not LogRecordExportResult.SUCCESS:
            self._size = max(1, self._size // 2)
            raise NotAcknowledged(f"{len(batch)} log records not acknowledged by the collector")
        self._size = self.limit
        last = rows[-1][0]["id"]
        self._store.advance_log_export(last)
        self._cursor = last
        self.acked += len(rows)
        self.backlog = max(0, self.backlog - len(rows))
        return len(rows)

    def _close_store(self) -> None:
        if self._store is not None:
            try:
                self._store.close()
            except Exception:
                pass
            self._store = None
