"""The audit writer process: builds the SQLite audit log, and the OTLP spans, from the journal.

mitmproxy runs every flow on one event loop, and Python threads share one GIL: any CPU a
sink spends in the proxy's process is taken from the proxy. So the proxy only appends each
record to the journal (``llmtap.sinks.audit``), and this separate process, started and
supervised by the audit sink (``python -m llmtap.audit.writer SETTINGS_JSON``), does the slow part
at a lower CPU priority: SQLite inserts, the hash chain, retention, and span export.

Generations: every journal generation but the newest is sealed (see ``llmtap.audit.journal``);
a sealed one is applied to its end, its offset row deleted, then its file unlinked. The newest
is applied as far as its complete lines go, until the proxy says ``stop`` (it sealed it).

Talking to the proxy, one line at a time:

- stdin: ``flush`` (look at the journal now), ``stop`` (apply and retire everything, then exit).
  End of file without ``stop`` means the proxy died: apply what is complete and exit.
- stdout: a JSON status whenever something changed: ``positions`` (generation -> offset in
  SQLite, for each generation still on disk), ``newest`` (the newest generation seen), and this
  process's health since it started: ``errors`` by stage, ``dropped`` rows, ``span_failures``,
  ``gauges``. Its log lines go to the proxy's stderr.

Spans follow the audit log: a span is queued once its row is committed, so a crash between the
two can repeat a span (same ids) but never lose one that was journaled; while SQLite cannot be
written, spans wait with the rows.

OTLP log records (``--otlp-logs``) follow the store, not the batches: a thread of this process
(``llmtap.audit.logexport``) reads the committed rows after its cursor back from the store and
moves the cursor only once the collector acknowledged them; this loop only wakes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import select
import signal
import sys
import time
from typing import Any

from llmtap.audit.control import STOP_TIMEOUT_SECONDS, WriterStatus, next_backoff, writer_settings
from llmtap.audit.journal import fsync_path, generation_path, generations, lock_file, read_lines
from llmtap.audit.stores import open_store, transient_errors
from llmtap.config import Settings
from llmtap.health import Health
from llmtap.record import ExchangeRecord

log = logging.getLogger("llmtap")

POLL_SECONDS = 0.05  # how often the journal is looked at; also how long a batch gathers
NICENESS = 10  # below the proxy: on a shared core the proxy comes first, the journal absorbs the lag
REPORT_EVERY_SECONDS = 1.0
HEAD_EVERY_SECONDS = 60.0  # how often the chain head is published (a log line; see `verify --against`)


class Writer:
    """One pass at a time over the journal: ``cycle`` applies what is there."""

    def __init__(self, settings: Settings, health: Health, *, prune_batch: int = 500, max_backoff: float = 5.0) -> None:
        self.settings = settings
        self.health = health
        self.prune_batch = prune_batch
        self.fsync = settings.fsync == "batch"
        self.store: Any = None  # llmtap.audit.stores: SQLite or PostgreSQL
        self._head_at = 0.0
        self._published: tuple[str, int] | None = None  # the last chain head logged
        self.newest = 0
        self.on_disk: list[int] = []
        self._offsets: dict[int, int] = {}
        self._lock_fd: int | None = None
        self.spans = None
        if settings.otlp_configured:
            try:
                from llmtap.tracing import RecordSpans

                self.spans = RecordSpans(settings, health)
            except Exception as exc:
                health.error("start_spans", exc, "spans disabled")
        self.logs = None
        if settings.otlp_logs:
            try:
                from llmtap.audit.logexport import LogExport

                self.logs = LogExport(settings, health, lambda: open_store(settings), max_backoff=max_backoff)
            except Exception as exc:
                health.error("start_log_export", exc, "OTLP log export disabled")

    def positions(self) -> dict[int, int]:
        if self.store is not None:
            self._offsets = dict(self.store.offsets)  # kept while SQLite is unreachable
        return {gen: self._offsets.get(gen, 0) for gen in self.on_disk}

    def cycle(self, final: bool) -> bool:
        """Apply the journal; True once nothing complete is pending (with ``final``: nothing at all).

        Raises ``sqlite3.Error``/``OSError`` when the audit log cannot be written: the caller
        backs off and calls again; nothing was lost, the lines wait in the journal.
        """
        db = self.settings.journal_base
        gens = self.on_disk = generations(db)
        if self._lock_fd is None:
            try:
                self._lock_fd = lock_file(f"{db}.writer.lock", wait=False)
            except BlockingIOError:  # the writer of an earlier proxy is finishing: wait for it
                time.sleep(POLL_SECONDS)
                return False
        if gens and gens[-1] > self.newest:
            self.newest = gens[-1]
            if self.fsync:
                fsync_path(os.path.dirname(db) or ".")
        if self.store is None:
            self.store = open_store(self.settings)
            if self.logs is not None:
                self.logs.notify()  # rows committed by an earlier run may still await their export
        caught_up = True
        for gen in gens:
            if final or gen != gens[-1]:
                self._retire(gen)
            else:
                caught_up = self._apply(gen, batches=1)  # appends may never pause: one batch, then report
        self.on_disk = gens[-1:] if gens and not final else []  # the sealed ones were retired, in order
        days = self.settings.retention_days
        cutoff, held = time.time() - days * 86400, self.logs is not None
        if days > 0 and self.store.prune(cutoff, self.prune_batch, hold_for_export=held) == self.prune_batch:
            caught_up = False  # more to delete: come straight back
        if self.settings.rollup_retention_days:
            self.store.prune_rollups(time.time() - self.settings.rollup_retention_days * 86400)
        if time.monotonic() - self._head_at > HEAD_EVERY_SECONDS or final:
            self.publish_head()
        return caught_up

    def publish_head(self) -> None:
        """Log the chain head: a saved line lets ``llmtap audit verify --against`` prove later
        that nobody rewrote the chain up to it (not even a database administrator)."""
        head = getattr(self.store, "head", None)
        rows = getattr(self.store, "rows", None)
        due = time.monotonic() - self._head_at > HEAD_EVERY_SECONDS
        if head is None or rows is None or (not due and (head, rows) == self._published):
            return
        self._head_at, self._published = time.monotonic(), (head, rows)
        doc = {"instance_id": getattr(self.store, "instance", None), "rows": rows, "head": head}
        log.info("chain head %s", json.dumps(doc, sort_keys=True))

    def _retire(self, gen: int) -> None:
        """Apply what is left of a sealed generation, then delete it."""
        path = generation_path(self.settings.journal_base, gen)
        self._apply(gen)
        tail = os.path.getsize(path) - self.store.offsets.get(gen, 0)
        if tail:  # cut short when a proxy died mid-write: its client got no response
            self.health.error("audit", ValueError(f"{tail} bytes"), f"torn tail of journal {gen} skipped")
        self.store.forget(gen)  # first: if we die before the unlink, the replay is deduplicated
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _apply(self, gen: int, batches: float = math.inf) -> bool:
        """Apply up to ``batches`` batches of complete lines; True when none was left."""
        path = generation_path(self.settings.journal_base, gen)
        offset = self.store.offsets.get(gen, 0)
        while batches > 0:
            if self.fsync:
                fsync_path(path)
            lines, end = read_lines(path, offset)
            if end == offset:
                return True
            more = os.path.getsize(path) > end  # a backlog: the rollups may wait for the next batches
            self._settle(self.store.apply(gen, lines, end, more=more))
            offset, batches = end, batches - 1
        return False

    def _settle(self, batch: Any) -> None:
        if batch.corrupt:
            self.health.error("audit", batch.corrupt[0], f"{len(batch.corrupt)} torn journal line(s) skipped")
        if batch.rejected:
            self.health.error("audit", batch.rejected[0], "row rejected by the audit database")
            self.health.add_audit_dropped(len(batch.rejected))
        conflicts = getattr(batch, "conflicts", ())
        if conflicts:  # an exchange id stored already with other contents: never a silent skip
            self.health.add_errors("audit_conflict", len(conflicts))
            log.error(
                "%d exchange id(s) already stored with different contents (kept the stored row): %s",
                len(conflicts),
                ", ".join(conflicts[:5]),
            )
        if self.logs is not None and batch.records:
            self.logs.notify()  # committed: the export thread reads them back from the store
        if self.spans is not None:
            for data in batch.records:
                try:
                    record = ExchangeRecord.from_dict(data)
                except (ValueError, TypeError) as exc:
                    self.health.error("spans", exc, "journaled record unfit for a span")
                    continue
                self.spans.emit(record)

    def status(self) -> WriterStatus:
        health = self.health
        gauges = {}
        for name, read in list(health.gauges.items()):
            with contextlib.suppress(Exception):
                gauges[name] = float(read())
        return WriterStatus(
            positions=self.positions(),
            newest=self.newest,
            errors=dict(health.internal_errors),
            dropped=health.audit_dropped,
            span_failures=health.span_export_failures,
            gauges=gauges,
        )

    def close(self) -> None:
        if self.logs is not None:
            self.logs.close()
        if self.spans is not None:
            self.spans.close()
        if self.store is not None:
            self.store.close()


def run_loop(writer: Writer, commands: int, report, *, max_backoff: float) -> None:
    """The process's loop: cycle every POLL_SECONDS (backing off while the store fails) until told
    to stop, or until the proxy is gone."""
    errors = transient_errors(writer.settings.db)
    stopping = orphaned = False
    done, delay, deadline, last = True, 0.0, math.inf, None
    while True:
        # back off while failing; straight on while lines are pending; else look every POLL_SECONDS
        wait = delay or (POLL_SECONDS if done else 0.0)
        ready, _, _ = select.select([commands], [], [], wait)
        if ready:
            data = os.read(commands, 4096)
            orphaned = not data
            if b"stop" in data and not stopping:
                stopping, deadline = True, time.monotonic() + STOP_TIMEOUT_SECONDS
        try:
            done = writer.cycle(final=stopping)
            delay = 0.0
        except errors as exc:  # locked, read-only, disk full, server gone: retry, lose nothing
            done = False
            writer.health.error("audit", exc, "audit log not writable; records wait in the journal")
            if writer.store is not None:
                with contextlib.suppress(Exception):
                    writer.store.close()
                writer.store = None
            delay = next_backoff(delay, max_backoff)
        status = writer.status()
        if status != last or time.monotonic() - report.at > REPORT_EVERY_SECONDS:
            report(status)
            last = status
        if orphaned or (stopping and (done or time.monotonic() > deadline)):
            return


class Reporter:
    """Writes status lines to the proxy; ``at`` is when the last one went."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.at = 0.0

    def __call__(self, status: WriterStatus) -> None:
        self.at = time.monotonic()
        with contextlib.suppress(BrokenPipeError):  # the proxy is gone; the loop sees EOF next
            self.stream.write(status.to_line())
            self.stream.flush()


def main(argv: list[str] | None = None) -> None:
    settings_json, tuning_json = argv or sys.argv[1:]
    args = json.loads(tuning_json)
    # the proxy decides when this process ends (stdin), also on Ctrl-C or SIGTERM to the group
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    logging.basicConfig(level=logging.INFO, format="llmtap writer: %(message)s", stream=sys.stderr)
    settings = writer_settings(settings_json, os.environ)
    writer = Writer(settings, Health(), prune_batch=args["prune_batch"], max_backoff=args["max_backoff"])
    try:
        run_loop(writer, sys.stdin.fileno(), Reporter(sys.stdout), max_backoff=args["max_backoff"])
    finally:
        writer.close()


if __name__ == "__main__":
    main()
