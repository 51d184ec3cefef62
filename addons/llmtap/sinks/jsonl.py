"""JSON-lines export: one canonical JSON record per line, to a file or stdout.

Log shippers tail it; tests read it. Each record is one ``os.write`` on an ``O_APPEND``
descriptor, so lines never interleave and a crash leaves at most the last line partial.

Failure policy: a failed write (disk full, closed pipe) is counted as an internal error of
stage ``jsonl`` and the record is not retried here (the audit log is the system of record).
"""

from __future__ import annotations

import os

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


class JsonlSink:
    name = "jsonl"

    def __init__(self, settings: Settings, health: Health) -> None:
        self.health = health
        target = settings.jsonl
        self._file = None if target == "-" else AppendOnlyFile(target)
        self._fd = 1 if self._file is None else self._file.fd

    def emit(self, record: ExchangeRecord) -> None:
        try:
            os.write(self._fd, (record.to_json() + "\n").encode())
        except OSError as exc:
            self.health.error(self.name, exc)

    def flush(self, timeout: float = 10.0) -> None:
        """Each line went to the OS when it was emitted; nothing is buffered here."""

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
