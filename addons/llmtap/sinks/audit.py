"""The audit log sink: one hash-chained SQLite row per exchange, the system of record for spend.

Data path, built so that no exchange a client received is lost, even on ``kill -9``, and so
that SQLite never costs the proxy CPU::

    emit() on the event loop --one os.write, O_APPEND--> <db>.journal.<gen>   (canonical JSON lines)
                                                            | the writer process (llmtap.audit.writer)
                                                            v
    SQLite (WAL): INSERT the rows + UPDATE journal_offsets(gen, offset), in ONE transaction

``emit`` runs in mitmproxy's response/error hook, before the response is released to the
client, and only appends one line to the journal (no fsync, no SQLite). A separate process
applies the journal in batches and stores how far it got in the same transaction as the rows,
so whenever it starts it resumes exactly where the last committed batch ended: nothing twice,
nothing skipped (``exchange_id`` is also UNIQUE, a second guard). This sink starts that
process, restarts it if it dies, rotates the journal to a new generation once the current one
is large, and on ``close()`` seals the journal and waits for the process to apply and retire
everything. If the proxy itself dies, the process applies what is complete and exits; the
next start replays the rest.

Durability: with ``fsync=never`` a record is safe once ``emit`` returned (the OS holds it), so
a crash or ``kill -9`` of llmtap loses nothing; a power cut can lose what the OS had not yet
written. With ``fsync=batch`` the writer fsyncs the journal before each batch and commits with
``synchronous=FULL``: a power cut loses at most the records of the batch in progress
(typically milliseconds of traffic); the hot path never fsyncs.

Failure policy: llmtap never slows or breaks a request for the audit log. If SQLite cannot be
written (locked, read-only, disk full, missing directory) the records wait in the journal and
the writer retries with backoff (counted in ``llmtap_internal_errors_total{stage="audit"}``,
logged once). If even the journal cannot be appended to, records wait in a bounded in-memory
queue that this sink retries; a record that does not fit, or a row SQLite rejects, is dropped,
counted in ``Health.audit_dropped`` (``llmtap_audit_dropped_total``) and logged.
``health.gauges["audit_queue_depth"]`` is the number of records emitted but not yet in SQLite.

The database itself (schema, migrations, rows, the hash chain, retention) is ``llmtap.audit.sqlite``.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import logging
import os
import select
import subprocess
import threading
import time

from llmtap.audit import control
from llmtap.audit.control import WriterStatus
from llmtap.audit.journal import AuditLogInUse, Journal, generation_path, generations
from llmtap.audit.sqlite import check_audit_log
from llmtap.config import Settings
from llmtap.health import Health
from llmtap.record import ExchangeRecord

__all__ = ["AuditLogInUse", "AuditSink"]

log = logging.getLogger("llmtap")


class AuditSink:
    """Journal on the event loop, SQLite in the writer process (see the module docstring)."""

    name = "audit"
    POLL_SECONDS = 0.05
    MAX_RESTART_DELAY_SECONDS = 5.0
    DRAIN_BATCH = 100  # records moved from memory to the journal per lock hold
    CLOSE_TIMEOUT_SECONDS = control.STOP_TIMEOUT_SECONDS + 5

    def __init__(
        self,
        settings: Settings,
        health: Health,
        *,
        rotate_bytes: int = 1 << 20,
        memory_limit: int = 10_000,
        prune_batch: int = 500,
        max_backoff: float = 5.0,
    ) -> None:
        self.settings = settings
        self.health = health
        self.rotate_bytes = rotate_bytes
        if not settings.db_is_server:
            check_audit_log(settings.db)  # a foreign SQLite file: this sink does not start
        if settings.journal_dir:
            with contextlib.suppress(OSError):  # else the journal open fails below, and is retried
                os.makedirs(settings.journal_dir, mode=0o700, exist_ok=True)
        self._journal = Journal(settings.journal_base)
        #: unapplied journal bytes (this run's appends and what earlier runs left), bounded by
        #: settings.journal_max_bytes: past it records are dropped and counted, never waited for
        self._pending_bytes = 0
        self._inherited: dict[int, int] = {}
        self._command = control.writer_command(settings, prune_batch=prune_batch, max_backoff=max_backoff)
        self._cond = threading.Condition()  # guards the journal, _memory, _ends and the writer's positions
        self._memory: collections.deque[bytes] = collections.deque()
        self._memory_limit = memory_limit
        #: generation -> end offset of each record this run appended to it (until it is retired)
        self._ends: dict[int, list[int]] = {}
        self._positions: dict[int, int] = {}  # what the writer last said is in SQLite
        self._newest_seen = 0
        self._reported: WriterStatus | None = None  # the writer's last status since it (re)started
        self._closed = False  # emits are refused from here on
        self._sealed = False  # the journal is closed for good; emits wait in memory, then are lost
        self._drop_logged = False
        self._stopping = threading.Event()
        self._writer: subprocess.Popen | None = None
        for gen in generations(settings.journal_base):
            with contextlib.suppress(OSError):
                self._inherited[gen] = os.path.getsize(generation_path(settings.journal_base, gen))
        self._pending_bytes = sum(self._inherited.values())
        try:
            self._open()
        except OSError as exc:  # records wait in memory; this sink retries opening the journal
            health.error(self.name, exc, "cannot open the audit journal")
        health.gauges["audit_queue_depth"] = self._backlog
        self._thread = threading.Thread(target=self._supervise, name="llmtap-audit", daemon=True)
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
            elif self._pending_bytes + len(line) > self.settings.journal_max_bytes:
                dropped = True  # the database has been away too long: the bound keeps the disk
            elif not self._memory and self._journal.fd is not None:
                try:
                    self._ends[self._journal.gen].append(self._journal.append(line))
                    self._pending_bytes += len(line)
                except OSError as exc:
                    fault, dropped = exc, not self._hold(line)
            else:
                dropped = not self._hold(line)
        if fault is not None:
            self.health.error(self.name, fault, "journal append failed; records held in memory")
        if dropped:
            self._dropped(1)

    def _hold(self, line: bytes) -> bool:
        """Caller holds ``_cond``. Keep a line in memory for the supervisor to journal later."""
        if len(self._memory) >= self._memory_limit:
            return False
        self._memory.append(line)
        return True

    def _dropped(self, n: int) -> None:
        self.health.add_audit_dropped(n)
        if not self._drop_logged:
            self._drop_logged = True
            log.error("llmtap audit log dropped %d record(s); see llmtap_audit_dropped_total", n)

    def _backlog(self) -> int:
        """Records emitted but not yet in SQLite (the ``audit_queue_depth`` gauge)."""
        with self._cond:
            pending = len(self._memory)
            for gen, ends in self._ends.items():
                pending += len(ends) - bisect.bisect_right(ends, self._positions.get(gen, 0))
            return pending

    def _settled(self) -> bool:
        """Caller holds ``_cond``: everything emitted is in SQLite and every sealed generation,
        this run's or an earlier one's, is retired."""
        return (
            self._reported is not None  # the writer has looked at the journal since it (re)started
            and self._backlog() == 0
            and all(gen >= self._journal.gen for gen in self._positions)
        )

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every record emitted so far, and any earlier run left, is in SQLite (or timeout)."""
        self._tell(b"flush\n")
        with self._cond:
            self._cond.wait_for(self._settled, timeout)

    def close(self) -> None:
        """Seal the journal, let the writer apply and retire it, stop it (bounded by
        CLOSE_TIMEOUT_SECONDS). Only records that never reached the journal are lost, and counted;
        if SQLite stays unwritable, the journal is left for the next start to replay."""
        self._stopping.set()
        self._thread.join(self.CLOSE_TIMEOUT_SECONDS + 5)
        with self._cond:
            self._closed = True
            lost = len(self._memory)
            self._memory.clear()
            self._journal.release()
        if lost:
            self._dropped(lost)
        if self.health.gauges.get("audit_queue_depth") == self._backlog:
            del self.health.gauges["audit_queue_depth"]
        for name in self._reported.gauges if self._reported else ():  # the writer's, such as span_queue_depth
            self.health.gauges.pop(name, None)

    # --- the supervisor thread: journal upkeep and the writer process ---
    def _open(self) -> None:
        """Caller holds ``_cond`` (or is the constructor)."""
        self._journal.open()
        self._ends[self._journal.gen] = []

    def _supervise(self) -> None:
        restart_at, delay, stop_sent, deadline = 0.0, 0.0, False, None
        buffer = b""
        while True:
            stopping = self._stopping.is_set()
            if stopping and deadline is None:
                deadline = time.monotonic() + self.CLOSE_TIMEOUT_SECONDS
            try:
                self._drain_memory()
                if not stopping:
                    self._rotate_if_large()
            except OSError as exc:  # disk full or directory gone: the records stay in memory
                self.health.error(self.name, exc, "audit journal not writable; records held in memory")
            if self._writer is None and time.monotonic() >= restart_at:
                stop_sent = False
                if not self._start_writer():
                    delay = control.next_backoff(delay, self.MAX_RESTART_DELAY_SECONDS)
                    restart_at = time.monotonic() + delay
            if stopping and not stop_sent and self._writer is not None:
                with self._cond:
                    self._sealed = True
                    self._journal.close_fd()  # the writer may now retire every generation
                stop_sent = self._tell(b"stop\n")
            if self._writer is None:
                if stopping and time.monotonic() > deadline:
                    return
                self._stopping.wait(self.POLL_SECONDS)
                continue
            pipe = self._writer.stdout
            if select.select([pipe], [], [], self.POLL_SECONDS)[0]:
                data = os.read(pipe.fileno(), 1 << 16)
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    try:
                        self._absorb(WriterStatus.from_line(line))
                    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # not a status line
                        self.health.error(self.name, exc, "unreadable audit writer status")
                if not data:  # the writer exited
                    code = self._reap()
                    buffer = b""
                    if stopping and stop_sent:
                        return
                    self.health.error(
                        self.name, RuntimeError(f"exit status {code}"), "audit writer process died; restarting"
                    )
                    delay = control.next_backoff(delay, self.MAX_RESTART_DELAY_SECONDS)
                    restart_at = time.monotonic() + delay
            if stopping and time.monotonic() > deadline:
                self._writer.kill()  # SQLite stays unwritable: the journal waits for the next start
                self._reap()
                return

    def _reap(self) -> int:
        """Wait for the exited writer and close its pipes; its exit status."""
        proc, self._writer = self._writer, None
        code = proc.wait()
        with contextlib.suppress(OSError):  # a command it never read
            proc.stdin.close()
        proc.stdout.close()
        return code

    def _start_writer(self) -> bool:
        self._reported = None
        try:
            self._writer = subprocess.Popen(
                self._command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=_writer_env(self.settings.db),
            )
        except OSError as exc:
            self.health.error(self.name, exc, "cannot start the audit writer process")
            return False
        return True

    def _tell(self, command: bytes) -> bool:
        proc = self._writer
        if proc is None:
            return False
        try:
            proc.stdin.write(command)
            proc.stdin.flush()
        except (BrokenPipeError, ValueError):  # it is exiting; the supervisor restarts it
            return False
        return True

    def _absorb(self, status: WriterStatus) -> None:
        """Take in a writer status: positions, and its health counters as deltas."""
        positions = status.positions
        with self._cond:
            self._positions, self._newest_seen = positions, max(self._newest_seen, status.newest)
            for gen in list(self._ends):
                if gen not in positions and gen <= self._newest_seen and gen != self._journal.gen:
                    del self._ends[gen]  # retired: every record of it is in SQLite
            for gen in list(self._inherited):
                if gen not in positions and gen <= self._newest_seen:
                    del self._inherited[gen]
            self._pending_bytes = sum(
                (ends[-1] if ends else 0) - positions.get(gen, 0) for gen, ends in self._ends.items()
            ) + sum(size - positions.get(gen, 0) for gen, size in self._inherited.items())
            self._cond.notify_all()
        last, self._reported = self._reported or WriterStatus(), status
        for stage, count in status.errors.items():
            self.health.add_errors(stage, count - last.errors.get(stage, 0))
        self.health.add_audit_dropped(status.dropped - last.dropped)
        self.health.add_span_export_failures(status.span_failures - last.span_failures)
        for name, value in status.gauges.items():
            self.health.gauges[name] = lambda value=value: value

    def _rotate_if_large(self) -> None:
        with self._cond:
            if self._journal.fd is not None and self._journal.size >= self.rotate_bytes:
                self._journal.rotate()
                self._ends[self._journal.gen] = []

    def _drain_memory(self) -> None:
        """Move records held in memory (the journal was unwritable) into the journal.

        In batches, releasing the lock in between, so that ``emit`` (on the event loop) never
        waits for more than a batch; new records join the memory queue's tail meanwhile, so the
        order is kept.
        """
        while True:
            with self._cond:
                if not self._memory or self._sealed:
                    return
                if self._journal.fd is None:
                    self._open()
                ends = self._ends[self._journal.gen]
                for _ in range(min(self.DRAIN_BATCH, len(self._memory))):
                    ends.append(self._journal.append(self._memory[0]))  # raises: the line stays
                    self._pending_bytes += len(self._memory.popleft())


def _writer_env(db: str) -> dict[str, str]:
    """The proxy's environment (OTEL_* and PG* included) and the ``--db`` (kept out of the
    public argv). The writer runs in Python's isolated mode, which ignores PYTHONPATH: its
    import path is set by ``control.writer_command``."""
    return {**os.environ, control.DB_ENV: db}
