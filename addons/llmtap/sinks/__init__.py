"""Sinks receive finished records. They share one small interface.

``emit`` is called on mitmproxy's event loop, once per record, and must not block: a sink
that does slow work hands the record on, to the audit writer process through the journal
(``llmtap.audit.writer``: SQLite, and the spans when the audit log is on), or to a thread of its own
(``llmtap.background.QueueThread``, the OTLP SDK's batch processor). The only I/O on the loop is one append per
record to a local file: the audit journal, and the JSON-lines file when one is configured. ``flush`` waits until what was
emitted so far is durable or exported; ``close`` flushes and releases resources. A sink never
raises into the proxy: the addon counts an exception from ``emit`` as an internal error.
"""

from __future__ import annotations

from typing import Protocol

from llmtap.record import ExchangeRecord


class Sink(Protocol):
    name: str

    def emit(self, record: ExchangeRecord) -> None: ...

    def flush(self, timeout: float = 10.0) -> None: ...

    def close(self) -> None: ...
