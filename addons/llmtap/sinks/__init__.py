"""Sinks receive finished records. They share one small interface.

``emit`` is called on mitmproxy's event loop, once per record, and must not block: a sink
that does slow work hands the record on, to the audit writer process through the journal
(``llmtap.writer``: SQLite, and the spans when the audit log is on), or to a thread of its own
(``ThreadedSink``, the OTLP SDK's batch processor). The only I/O on the loop is one append per
record to a local file: the audit journal, and the JSON-lines file when one is configured. ``flush`` waits until what was
emitted so far is durable or exported; ``close`` flushes and releases resources. A sink never
raises into the proxy: the addon counts an exception from ``emit`` as an internal error.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Protocol

from llmtap.health import Health
from llmtap.record import ExchangeRecord


class Sink(Protocol):
    name: str

    def emit(self, record: ExchangeRecord) -> None: ...

    def flush(self, timeout: float = 10.0) -> None: ...

    def close(self) -> None: ...


_STOP = object()


class ThreadedSink:
    """Base for sinks whose work is slow: a bounded queue drained by one daemon thread.

    Failure policy: when the queue is full the item is dropped and counted as an internal
    error of this sink's stage (the audit sink does not use this: its journal loses nothing).
    """

    name = "threaded"

    def __init__(self, health: Health, maxsize: int = 10_000) -> None:
        self.health = health
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._thread = threading.Thread(target=self._run, name=f"llmtap-{self.name}", daemon=True)
        self._thread.start()

    def handle(self, item: Any) -> None:
        raise NotImplementedError

    def emit(self, item: Any) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full as exc:
            self.dropped(exc)

    def dropped(self, exc: queue.Full) -> None:
        """An item found the queue full; by default an internal error of this stage."""
        self.health.error(self.name, exc, "queue full, dropped")

    def flush(self, timeout: float = 10.0) -> None:
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return
        done.wait(timeout)

    def close(self) -> None:
        self.flush()
        self._queue.put(_STOP)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self.handle(item)
            except Exception as exc:  # fail open: count, log once, keep draining
                self.health.error(self.name, exc)
