"""The audit log sink: one hash-chained SQLite row per exchange, the system of record for spend.

Data path, built so that no exchange a client received is lost, even on ``kill -9``::

    emit() on the event loop --one os.write, O_APPEND--> <db>.journal.<gen>   (canonical JSON lines)
                                                            | writer thread, batches
                                                            v
    SQLite (WAL): INSERT the rows + UPDATE journal_offsets(gen, offset), in ONE transaction

``emit`` runs in mitmproxy's response/error hook, before the response is released to the
client, and only appends one line to the journal (no fsync, no SQLite). The writer thread
applies journal lines in batches and stores how far it got in the same transaction as the
rows, so on start it resumes exactly where the last committed batch ended: nothing twice,
nothing skipped (``exchange_id`` is also UNIQUE, a second guard). Once the generation being
appended to is large, appends switch to the next one (under the append lock, so no line is
lost in between); the old one is applied to its end and retired: its offset row deleted,
then its file unlinked. A graceful ``close()`` applies and retires everything.

Durability: with ``fsync=never`` a record is safe once ``emit`` returned (the OS holds it), so
a crash or ``kill -9`` of llmtap loses nothing; a power cut can lose what the OS had not yet
written. With ``fsync=batch`` the writer fsyncs the journal before each batch and commits with
``synchronous=FULL``: a power cut loses at most the records of the batch in progress
(typically milliseconds of traffic); the hot path never fsyncs.

Failure policy: llmtap never slows or breaks a request for the audit log. If SQLite cannot be
written (locked, read-only, disk full, missing directory) the records wait in the journal and
the writer retries with backoff (counted in ``llmtap_internal_errors_total{stage="audit"}``,
logged once). If even the journal cannot be appended to, records wait in a bounded in-memory
queue that the writer retries; a record that does not fit, or a row SQLite rejects, is dropped,
counted in ``Health.audit_dropped`` (``llmtap_audit_dropped_total``) and logged.
``health.gauges["audit_queue_depth"]`` is the number of records emitted but not yet in SQLite.

The database itself (schema, migrations, rows, the hash chain, retention) is ``llmtap.auditdb``.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import math
import os
import sqlite3
import threading
import time

from llmtap.auditdb import AuditStore, Batch
from llmtap.config import Settings
from llmtap.health import Health
from llmtap.record import ExchangeRecord

log = logging.getLogger("llmtap")


# --- the journal -----------------------------------------------------------------------------------

class ShortWrite(OSError):
    """Part of a line reached the journal (disk full): a fragment the reader will skip."""


class AuditLogInUse(RuntimeError):
    """Another llmtap process is writing this audit log."""


class Journal:
    """Generation files ``<db>.journal.<gen>``; the sink serialises ``append`` and ``rotate``.

    A ``<db>.journal.lock`` flock keeps a second llmtap off the same journal (the kernel drops
    it when the process dies, even by ``kill -9``).
    """

    def __init__(self, db_path: str) -> None:
        self.prefix = f"{db_path}.journal."
        self._lock_fd = _lock(db_path)
        #: generations left by earlier runs (or rotated away): applied, then retired.
        self.retiring = self.generations()
        self.gen = max(self.retiring, default=0) + 1
        self.first_gen = self.gen  # generations from here on hold only this process's records
        self.fd: int | None = None
        self._torn = False

    def path(self, gen: int) -> str:
        return f"{self.prefix}{gen}"

    def generations(self) -> list[int]:
        directory, stem = os.path.split(self.prefix)
        try:
            names = os.listdir(directory or ".")
        except OSError:
            return []
        return sorted(int(n[len(stem):]) for n in names if n.startswith(stem) and n[len(stem):].isdigit())

    def open(self) -> None:
        while self.gen in self.retiring:  # closed by close(): never append to it again
            self.gen += 1
        self.fd = os.open(self.path(self.gen), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def sync_dir(self) -> None:
        """Make new generation files survive a power cut (``fsync=batch``)."""
        fsync_path(os.path.dirname(self.prefix) or ".")

    def append(self, line: bytes) -> None:
        """One ``os.write``; after a short write the next line starts with a newline to end the fragment."""
        data = b"\n" + line if self._torn else line
        written = os.write(self.fd, data)
        if written != len(data):
            self._torn = self._torn or written > 0
            raise ShortWrite(f"short write to {self.path(self.gen)}: {written} of {len(data)} bytes")
        self._torn = False

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def rotate(self) -> None:
        """Append to the next generation from now on; the old one joins ``retiring``."""
        old_fd, old_gen = self.fd, self.gen
        self.gen += 1
        try:
            self.open()
        except OSError:
            self.gen, self.fd = old_gen, old_fd
            raise
        os.close(old_fd)
        self.retiring.append(old_gen)

    def close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        self.close_fd()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _lock(db_path: str) -> int | None:
    try:
        fd = os.open(f"{db_path}.journal.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:  # directory missing or read-only: the journal cannot be written either
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditLogInUse(f"another llmtap process is writing the audit log {db_path}") from None
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


# --- the sink --------------------------------------------------------------------------------------

class AuditSink:
    """Journal on the event loop, SQLite on a writer thread (see the module docstring)."""

    name = "audit"
    IDLE_SECONDS = 1.0
    MAX_BACKOFF_SECONDS = 5.0
    DRAIN_BATCH = 100  # records moved from memory to the journal per lock hold
    BATCH_WINDOW_SECONDS = 0.05  # how long a woken writer gathers records before it applies them
    CLOSE_TIMEOUT_SECONDS = 10.0

    def __init__(
        self,
        settings: Settings,
        health: Health,
        *,
        rotate_bytes: int = 1 << 20,
        memory_limit: int = 10_000,
        prune_batch: int = 500,
    ) -> None:
        self.settings = settings
        self.health = health
        self.rotate_bytes = rotate_bytes
        self.prune_batch = prune_batch
        self._fsync = settings.fsync == "batch"
        self._journal = Journal(settings.db)
        self._cond = threading.Condition()  # guards the journal's fd, _memory and _backlog
        self._memory: collections.deque[bytes] = collections.deque()
        self._memory_limit = memory_limit
        self._backlog = 0  # records of this run emitted but neither in SQLite nor dropped
        self._closed = False
        self._drop_logged = False
        self._wake = threading.Event()
        self._stopping = threading.Event()
        try:
            self._journal.open()
        except OSError as exc:  # records wait in memory; the writer retries opening the journal
            health.error(self.name, exc, "cannot open the audit journal")
        self._gauge = lambda: self._backlog
        health.gauges["audit_queue_depth"] = self._gauge
        self._wake.set()  # replay what an earlier run left in the journal, right away
        self._thread = threading.Thread(target=self._run, name="llmtap-audit", daemon=True)
        self._thread.start()

    # --- event loop side ---
    def emit(self, record: ExchangeRecord) -> None:
        """Hand the record to the OS as one journal append (microseconds; never SQLite)."""
        try:
            if not self.settings.capture_content and (record.input_messages or record.output_messages):
                record = record.replace(input_messages=None, output_messages=None)
            line = (record.to_json() + "\n").encode("utf-8", "replace")  # a lone surrogate becomes "?"
        except Exception as exc:  # a record that cannot be serialised cannot be kept
            self.health.error(self.name, exc, "record not serialisable")
            self._dropped(1)
            return
        fault, dropped = None, False
        with self._cond:
            if self._closed:
                fault, dropped = RuntimeError("record emitted after the audit log was closed"), True
            else:
                self._backlog += 1
                if not self._memory and self._journal.fd is not None:
                    try:
                        self._append(line)
                        line = None
                    except OSError as exc:
                        fault = exc
                if line is not None:
                    dropped = not self._hold(line)
        if fault is not None:
            self.health.error(self.name, fault, "journal append failed; records held in memory")
        if dropped:
            self._dropped(1)
        self._wake.set()

    def _append(self, line: bytes) -> None:
        """Caller holds ``_cond``."""
        try:
            self._journal.append(line)
        except ShortWrite:
            self._backlog += 1  # the fragment is a line the reader will consume
            raise

    def _hold(self, line: bytes) -> bool:
        """Caller holds ``_cond``. Keep a line in memory for the writer to journal later."""
        if len(self._memory) >= self._memory_limit:
            self._backlog -= 1
            return False
        self._memory.append(line)
        return True

    def _dropped(self, n: int) -> None:
        self.health.add_audit_dropped(n)
        if not self._drop_logged:
            self._drop_logged = True
            log.error("llmtap audit log dropped %d record(s); see llmtap_audit_dropped_total", n)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every record emitted so far, and any earlier run left, is in SQLite (or timeout)."""
        self._wake.set()
        with self._cond:
            self._cond.wait_for(lambda: self._backlog <= 0 and not self._journal.retiring, timeout)

    def close(self) -> None:
        """Apply everything and retire the journal (bounded by CLOSE_TIMEOUT_SECONDS).

        If SQLite stays unwritable, the journal is left for the next start to replay; only
        records that never reached the journal are lost, and counted.
        """
        self._stopping.set()
        self._wake.set()
        self._thread.join(self.CLOSE_TIMEOUT_SECONDS + 5)
        with self._cond:
            self._closed = True
            lost = len(self._memory)
            self._memory.clear()
            self._backlog -= lost
            self._journal.release()
        if lost:
            self._dropped(lost)
        if self.health.gauges.get("audit_queue_depth") is self._gauge:
            del self.health.gauges["audit_queue_depth"]

    # --- writer thread ---
    def _run(self) -> None:
        store: AuditStore | None = None
        delay, deadline = 0.0, None
        while True:
            if not delay:
                if self._wake.wait(self.IDLE_SECONDS) and not self._stopping.is_set():
                    # let what arrives in the next moment join the same transaction: one batch
                    # per window instead of one per record (close cuts the window short)
                    self._stopping.wait(self.BATCH_WINDOW_SECONDS)
            elif self._stopping.is_set():
                time.sleep(delay)
            else:
                self._stopping.wait(delay)  # a backoff that new records do not cut short; close does
            self._wake.clear()
            stopping = self._stopping.is_set()
            if stopping and deadline is None:
                deadline = time.monotonic() + self.CLOSE_TIMEOUT_SECONDS
            done = healthy = True
            try:
                self._drain_memory()
            except OSError as exc:  # disk full or directory gone: the records stay in memory
                healthy = False
                self.health.error(self.name, exc, "audit journal not writable; records held in memory")
            try:
                if store is None:
                    store = AuditStore(
                        self.settings.db, fsync_batch=self._fsync,
                        capture_content=self.settings.capture_content,
                    )
                done = self._apply(store, final=stopping)
                if not stopping:
                    self._prune(store)
            except (sqlite3.Error, OSError) as exc:  # locked, read-only, disk full: retry, lose nothing
                healthy = done = False
                self.health.error(self.name, exc, "audit log not writable; records wait in the journal")
                if store is not None:
                    store.close()
                    store = None
            if healthy and not done:
                self._wake.set()  # more is waiting: no pause
            delay = 0.0 if healthy else min(max(delay * 2, 0.1), 0.5 if stopping else self.MAX_BACKOFF_SECONDS)
            if stopping and (done or time.monotonic() > deadline):
                break
        if store is not None:
            store.close()

    def _drain_memory(self) -> None:
        """Move records held in memory (the journal was unwritable) into the journal.

        In batches, releasing the lock in between, so that ``emit`` (on the event loop) never
        waits for more than a batch; new records join the memory queue's tail meanwhile, so the
        order is kept.
        """
        while True:
            with self._cond:
                if not self._memory:
                    return
                if self._journal.fd is None:
                    self._journal.open()
                for _ in range(min(self.DRAIN_BATCH, len(self._memory))):
                    self._append(self._memory[0])
                    self._memory.popleft()

    def _apply(self, store: AuditStore, final: bool) -> bool:
        """Apply the journal; retire finished generations; True once nothing complete is pending."""
        journal = self._journal
        for gen in list(journal.retiring):
            self._retire(store, gen)
        if journal.fd is None:
            return not self._memory
        if self._fsync:
            os.fsync(journal.fd)
        size, caught_up = self._apply_gen(store, journal.gen, batches=1)  # appends may never pause
        with self._cond:  # the append lock: no line slips in while the generation changes
            if final:
                journal.close_fd()  # later emits wait in memory (and are counted if close drops them)
                journal.retiring.append(journal.gen)
            elif journal.size() >= self.rotate_bytes:
                journal.rotate()  # its lines not applied yet are applied before it is retired
            else:
                return caught_up and not self._memory
        if self._fsync:
            journal.sync_dir()
        return self._apply(store, final)  # retire the generation just closed

    def _retire(self, store: AuditStore, gen: int) -> None:
        """Apply what is left of a generation nobody appends to any more, then delete it."""
        path = self._journal.path(gen)
        if os.path.exists(path):
            if self._fsync:
                fsync_path(path)
            offset, _ = self._apply_gen(store, gen)
            tail = os.path.getsize(path) - offset
            if tail:  # cut short when a process died mid-write: its client got no response
                self.health.error(self.name, ValueError(f"{tail} bytes"), f"torn tail of journal {gen} skipped")
        store.forget(gen)  # first: if we die before the unlink, the replay is deduplicated
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._journal.retiring.remove(gen)
        with self._cond:
            self._cond.notify_all()

    def _apply_gen(self, store: AuditStore, gen: int, batches: float = math.inf) -> tuple[int, bool]:
        """Apply up to ``batches`` batches of complete lines; return the offset reached and
        whether no complete line was left."""
        offset = store.offsets.get(gen, 0)
        while batches > 0:
            lines, end = read_lines(self._journal.path(gen), offset)
            if end == offset:
                return offset, True
            self._settle(gen, len(lines), store.apply(gen, lines, end))
            offset, batches = end, batches - 1
        return offset, False

    def _settle(self, gen: int, lines: int, batch: Batch) -> None:
        if gen >= self._journal.first_gen:
            with self._cond:
                self._backlog -= lines
                self._cond.notify_all()
        if batch.corrupt:
            self.health.error(self.name, batch.corrupt[0], f"{len(batch.corrupt)} torn journal line(s) skipped")
        if batch.rejected:
            self.health.error(self.name, batch.rejected[0], "row rejected by SQLite")
            self._dropped(len(batch.rejected))

    def _prune(self, store: AuditStore) -> None:
        """Retention: at most one small batch per writer cycle, so journal batches interleave."""
        days = self.settings.retention_days
        if days > 0 and store.prune(time.time() - days * 86400, self.prune_batch) == self.prune_batch:
            self._wake.set()  # more to delete: come straight back
