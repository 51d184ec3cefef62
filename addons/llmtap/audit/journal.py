"""The audit journal: append-only generation files ``<db>.journal.<gen>`` of canonical JSON lines.

The proxy appends (``Journal``); the writer process reads (``read_lines``, ``generations``)
and deletes a generation once it is in SQLite. Only the proxy creates generations, always
numbered above every existing one, and it never appends to a generation again once a newer
one exists: so every generation but the newest is sealed, and the newest is sealed too once
the proxy closed it (or died: its ``<db>.journal.lock`` is then free).
"""

from __future__ import annotations

import fcntl
import os


class ShortWrite(OSError):
    """Part of a line reached the journal (disk full): a fragment the reader will skip."""


class AuditLogInUse(RuntimeError):
    """Another llmtap process is writing this audit log."""


def journal_prefix(db_path: str) -> str:
    return f"{db_path}.journal."


def generations(db_path: str) -> list[int]:
    """The generation numbers on disk, oldest first."""
    directory, stem = os.path.split(journal_prefix(db_path))
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return []
    return sorted(int(n[len(stem) :]) for n in names if n.startswith(stem) and n[len(stem) :].isdigit())


def generation_path(db_path: str, gen: int) -> str:
    return f"{journal_prefix(db_path)}{gen}"


class Journal:
    """The appending side; the audit sink serialises ``append``, ``open`` and ``rotate``.

    A ``<db>.journal.lock`` flock keeps a second llmtap off the same journal (the kernel drops
    it when the process dies, even by ``kill -9``).
    """

    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        try:
            self._lock_fd: int | None = lock_file(f"{journal_prefix(db_path)}lock", wait=False)
        except BlockingIOError:
            raise AuditLogInUse(f"another llmtap process is writing the audit log {db_path}") from None
        except OSError:  # directory missing or read-only: the journal cannot be written either
            self._lock_fd = None
        #: above anything an earlier run left: older generations are replayed, never appended to
        self.gen = max(generations(db_path), default=0) + 1
        self.fd: int | None = None
        self.size = 0  # bytes in the current generation: appends are ours alone
        self._torn = False

    def path(self, gen: int) -> str:
        return generation_path(self.db_path, gen)

    def open(self) -> None:
        """Start a new generation file (never an existing one: O_EXCL)."""
        self.gen = max(self.gen, max(generations(self.db_path), default=0) + 1)
        self.fd = os.open(self.path(self.gen), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        self.size = 0

    def append(self, line: bytes) -> int:
        """One ``os.write``; return the offset after the line. After a short write the next
        line starts with a newline, which ends the fragment."""
        data = b"\n" + line if self._torn else line
        written = os.write(self.fd, data)
        self.size += written
        if written != len(data):
            self._torn = self._torn or written > 0
            raise ShortWrite(f"short write to {self.path(self.gen)}: {written} of {len(data)} bytes")
        self._torn = False
        return self.size

    def rotate(self) -> None:
        """Append to the next generation from now on; the old one is sealed."""
        old_fd, old_gen, old_size = self.fd, self.gen, self.size
        self.gen += 1
        try:
            self.open()
        except OSError:
            self.gen, self.fd, self.size = old_gen, old_fd, old_size
            raise
        os.close(old_fd)

    def close_fd(self) -> None:
        """Seal the current generation."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.gen += 1  # a later open() must not append to a sealed generation

    def release(self) -> None:
        self.close_fd()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def lock_file(path: str, *, wait: bool) -> int:
    """The fd of an exclusive flock on ``path`` (released when the process dies, even by
    ``kill -9``). Raises ``BlockingIOError`` when held elsewhere and ``wait`` is false, and
    ``OSError`` when the file cannot be created."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: str, offset: int, limit: int = 4 << 20) -> tuple[list[bytes], int]:
    """Whole lines from ``offset`` (about ``limit`` bytes), and the offset after the last one."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(limit)
        while b"\n" not in data and len(data) >= limit:  # a single line longer than limit
            more = f.read(limit)
            if not more:
                break
            data += more
    end = data.rfind(b"\n") + 1
    return [line for line in data[:end].split(b"\n") if line], offset + end
