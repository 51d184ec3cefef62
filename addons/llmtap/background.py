"""A bounded queue drained by one daemon thread: how slow per-record work leaves the caller's thread."""

from __future__ import annotations

import queue
import threading
from typing import Any

from llmtap.health import Health

_STOP = object()


class QueueThread:
    """Base for record consumers whose work is slow: a bounded queue drained by one daemon thread.

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
