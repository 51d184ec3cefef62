"""JSON-lines export: one canonical JSON record per line, to a file or stdout.

Log shippers tail it; tests read it. To a file, each record is one ``os.write`` on an
``O_APPEND`` descriptor, on the event loop like the audit journal: lines never interleave, and
a short write (disk full) is detected and counted. To stdout, a slow reader (a pipe into a log
shipper) must not stall the proxy, so lines go through a bounded queue drained by a thread.

Failure policy: a failed write, or a line that finds the stdout queue full, is counted as an
internal error of stage ``jsonl`` and not retried (the audit log is the system of record).
"""

from __future__ import annotations

import os

from llmtap.background import QueueThread
from llmtap.config import Settings
from llmtap.health import Health
from llmtap.record import ExchangeRecord


class AppendOnlyFile:
    """An ``O_APPEND`` file written one whole line per ``os.write`` call."""

    def __init__(self, path: str, mode: int = 0o600) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)

    def append(self, data: bytes) -> None:
        written = os.write(self.fd, data)
        if written != len(data):  # regular files only write short when the disk is full
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")

    def close(self) -> None:
        os.close(self.fd)


class StdoutLines(QueueThread):
    """Writes queued lines to stdout from its own thread, however slowly stdout drains."""

    name = "jsonl"

    def handle(self, line: bytes) -> None:
        view = memoryview(line)
        while view:  # a pipe may take part of a line at a time
            view = view[os.write(1, view) :]


class JsonlSink:
    name = "jsonl"

    def __init__(self, settings: Settings, health: Health) -> None:
        self.health = health
        to_stdout = settings.jsonl == "-"
        self._file = None if to_stdout else AppendOnlyFile(settings.jsonl)
        self._stdout = StdoutLines(health) if to_stdout else None

    def emit(self, record: ExchangeRecord) -> None:
        line = (record.to_json() + "\n").encode("utf-8", "replace")
        if self._stdout is not None:
            self._stdout.emit(line)
            return
        try:
            self._file.append(line)
        except OSError as exc:
            self.health.error(self.name, exc)

    def flush(self, timeout: float = 10.0) -> None:
        if self._stdout is not None:
            self._stdout.flush(timeout)

    def close(self) -> None:
        if self._stdout is not None:
            self._stdout.close()
        elif self._file is not None:
            self._file.close()
            self._file = None
