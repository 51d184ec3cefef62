"""The SQLite audit store: schema, migrations, and applying journal batches.

The embedded default for one machine. Shared by the audit writer process (``AuditStore``
applies journal batches and prunes) and by the read-only ``llmtap report`` / ``llmtap audit
verify`` (``connect_readonly``, ``verify_chain``). Nothing here runs on mitmproxy's event
loop. Rows and the hash chain (the contract ``llmtap audit verify`` checks) are
``llmtap.audit.rows``: one chain per SQLite file.
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import operator
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import takewhile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from llmtap.audit import rollups
from llmtap.audit.rows import (
    GENESIS,
    JSON_COLUMNS,
    ChainCheck,
    Link,
    RowBuilder,
    as_digest,
    as_hex,
    body_json,
    chain_digest,
    chain_hash,
    content_row,
    insert_columns,
    read_record,
    row_builder,
    walk_chain,
)
from llmtap.config import Settings

if TYPE_CHECKING:  # the writer's; reports and verify only read (sqlite_utils costs 0.3 s to import)
    from sqlite_utils import Database

__all__ = [
    "GENESIS",
    "JSON_COLUMNS",
    "MIGRATIONS",
    "PAGE_SIZE",
    "AuditStore",
    "Batch",
    "ChainCheck",
    "NotAnAuditLog",
    "chain_anchor",
    "chain_hash",
    "check_audit_log",
    "connect",
    "connect_readonly",
    "migrate",
    "row_builder",
    "verify_chain",
]

PAGE_SIZE = 16384
#: Per-row faults: the row is dropped and counted; anything else (locked, I/O) retries the batch.
_ROW_SQL_FAULTS = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError)


# --- what SQLite stores in place of some hashed values (rows.py hashes the values themselves) ------

#: A lean row's ``prev_hash`` as SQLite stores it: empty, implying the previous row's
#: ``row_hash`` (the row's digest commits to it). Rows of older llmtaps store it whole.
IMPLIED = b""


def _uuid_bytes(text: str) -> bytes | str:
    hexed = text.replace("-", "")
    if len(text) != 36 or text[8] + text[13] + text[18] + text[23] != "----" or hexed != hexed.lower():
        return text
    return _hex_bytes(32, hexed)


def _uuid_text(raw: bytes) -> str:
    hexed = raw.hex()
    return f"{hexed[:8]}-{hexed[8:12]}-{hexed[12:16]}-{hexed[16:20]}-{hexed[20:]}"


def _hex_bytes(length: int, text: str) -> bytes | str:
    if len(text) != length or text != text.lower():
        return text
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return text
    return raw if len(raw) * 2 == length else text  # fromhex skips spaces


#: Ids stored as raw bytes when in their canonical text form (llmtap's own: a flow's UUID, W3C
#: trace and span ids, lowercase hex): 36 + 32 + 16 bytes of text become 16 + 16 + 8. Any other
#: text stays text, so each reads back as exactly the text that was hashed.
PACKED_IDS: dict[str, tuple[Callable[[str], bytes | str], Callable[[bytes], str]]] = {
    "exchange_id": (_uuid_bytes, _uuid_text),
    "trace_id": (functools.partial(_hex_bytes, 32), bytes.hex),
    "span_id": (functools.partial(_hex_bytes, 16), bytes.hex),
}


def packed_id(name: str, text: str) -> bytes | str:
    """An id as stored (to look a row up by it): ``packed_id("exchange_id", "e7b2...")``."""
    return PACKED_IDS[name][0](text)


@functools.lru_cache(maxsize=256)
def _packing(insert: str) -> tuple[tuple[int, Callable[[str], bytes | str]], ...]:
    """Where the ids sit in the parameters of an ``insert_sql``, and how each is packed."""
    names = insert_columns(insert)
    return tuple((names.index(name), pack) for name, (pack, _) in PACKED_IDS.items() if name in names)


def as_hashed(conn: sqlite3.Connection, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``rows`` (consecutive ``exchanges`` rows in id order, as dicts) with the values the chain
    hashed: ids as text, an implied ``prev_hash`` as the previous row's ``row_hash``."""
    previous = None
    for row in rows:
        for name, (_, unpack) in PACKED_IDS.items():
            if isinstance(row.get(name), bytes):
                row[name] = unpack(row[name])
        if row.get("prev_hash") == IMPLIED:
            row["prev_hash"] = as_digest(_row_hash_before(conn, row["id"]) if previous is None else previous)
        previous = row.get("row_hash")
        yield row


def _row_hash_before(conn: sqlite3.Connection, row_id: int) -> bytes | str:
    """The ``row_hash`` of the row before ``row_id`` (the chain's anchor for its first)."""
    found = conn.execute("SELECT row_hash FROM exchanges WHERE id < ? ORDER BY id DESC LIMIT 1", (row_id,)).fetchone()
    return chain_anchor(conn) if found is None else found[0]


def content_as_hashed(row: dict[str, Any]) -> dict[str, Any]:
    """A ``content`` row with its exchange id as text."""
    if isinstance(row.get("exchange_id"), bytes):
        row["exchange_id"] = _uuid_text(row["exchange_id"])
    return row


# --- schema: an append-only list of small migrations; PRAGMA user_version counts those applied ---


def _create_exchanges(db: Database) -> None:
    """One row per exchange: every record field, typed, plus derived timings and the chain."""
    db["exchanges"].create(
        {
            "id": int,
            "exchange_id": str,
            "operation": str,
            "method": str,
            "path": str,
            "request_start": float,
            "request_end": float,
            "response_start": float,
            "first_token_at": float,
            "response_end": float,
            "upstream_latency_s": float,
            "duration_s": float,
            "ttft_s": float,
            "client_address": str,
            "upstream_scheme": str,
            "upstream_host": str,
            "upstream_port": int,
            "router": str,
            "provider": str,
            "http_status": int,
            "error_type": str,
            "error_message": str,
            "stream": int,
            "key_fingerprint": str,
            "app_id": str,
            "labels": str,
            "weights": str,
            "policies": str,
            "traceparent": str,
            "trace_id": str,
            "span_id": str,
            "request_model": str,
            "max_tokens": int,
            "temperature": float,
            "top_p": float,
            "n": int,
            "best_of": int,
            "stop": str,
            "presence_penalty": float,
            "frequency_penalty": float,
            "logprobs": int,
            "seed": int,
            "tool_count": int,
            "tool_names": str,
            "tool_choice": str,
            "response_format": str,
            "logit_bias": int,
            "response_id": str,
            "response_object": str,
            "created_at": float,
            "response_model": str,
            "served_model": str,
            "served_provider": str,
            "served_owner": str,
            "served_namespace": str,
            "served_at": str,
            "input_tokens": int,
            "output_tokens": int,
            "total_tokens": int,
            "cached_input_tokens": int,
            "reasoning_tokens": int,
            "finish_reasons": str,
            "choice_count": int,
            "chunk_count": int,
            "cost_usd": float,
            "cost_prompt_usd": float,
            "cost_completion_usd": float,
            "cost_source": str,
            "cost_savings_usd": float,
            "cost_savings_prompt_usd": float,
            "cost_savings_completion_usd": float,
            "retries": int,
            "upstream_status_code": int,
            "score": float,
            "best_model": str,
            "candidate_count": int,
            "response_labels": str,
            "warning": str,
            "upstream_error": str,
            "category": str,
            "metadata_json": str,
            "prev_hash": str,
            "row_hash": str,
        },
        pk="id",
        not_null={"exchange_id", "prev_hash", "row_hash"},  # nothing else may cost a row
    )
    table = db["exchanges"]
    table.create_index(["exchange_id"], unique=True)
    for column in ("request_start", "response_model", "provider", "app_id", "key_fingerprint"):
        table.create_index([column])


def _create_content(db: Database) -> None:
    """Opt-in prompt/completion text, kept apart so the main table never holds any."""
    db["content"].create(
        {"exchange_id": str, "input_messages": str, "output_messages": str, "truncated": int},
        pk="exchange_id",
        foreign_keys=[("exchange_id", "exchanges", "exchange_id")],
    )


def _create_journal_offsets(db: Database) -> None:
    """How far each journal generation has been applied (written with the rows it covers)."""
    db["journal_offsets"].create({"gen": int, "offset": int}, pk="gen", not_null={"offset"})


def _add_family_and_cache_writes(db: Database) -> None:
    """Protocol families: which family read the exchange, cache writes, the service tier."""
    for name, kind in (
        ("family", str),
        ("cache_write_input_tokens", int),
        ("cache_write_1h_input_tokens", int),
        ("service_tier", str),
    ):
        db["exchanges"].add_column(name, kind)


def _add_pricing_columns(db: Database) -> None:
    """Exact cost and price provenance (NULL on older rows)."""
    for name, kind in (
        ("cost_nanousd", int),  # exact: integer nano-dollars; older rows have only cost_usd
        ("price_version", str),
        ("price_model", str),
    ):
        db["exchanges"].add_column(name, kind)


def _add_anomalies(db: Database) -> None:
    """Numbers an upstream sent that were not used (field -> "raw value: why"), as JSON."""
    db["exchanges"].add_column("anomalies", str)


def _add_parse_problem(db: Database) -> None:
    """Why part of an exchange was not read (a bound reached, an undecodable body)."""
    db["exchanges"].add_column("parse_problem", str)


def _add_family_columns(db: Database) -> None:
    """Record schema 2: OpenAI Responses, embeddings, and which record schema wrote each row.

    Rows written before have NULL here, which keeps their hashes; a NULL ``record_schema``
    reads as schema 1.
    """
    table = db["exchanges"]
    for name, kind in (
        ("tool_types", str),
        ("previous_response_id", str),
        ("conversation_id", str),
        ("background", int),
        ("api_version", str),
        ("input_count", int),
        ("dimensions", int),
        ("response_status", str),
        ("record_schema", int),
    ):
        table.add_column(name, kind)
    table.create_index(["previous_response_id"])
    table.create_index(["response_id"])


def _add_instance(db: Database) -> None:
    """The ``--instance`` display name of the llmtap that recorded the row (hashed like any column)."""
    db["exchanges"].add_column("instance", str)


def _create_pruned(db: Database) -> None:
    """Retention's ledger: what was deleted, and the hash the remaining chain starts from."""
    db["pruned"].create(
        {
            "id": int,
            "pruned_at": float,
            "cutoff": float,
            "rows": int,
            "first_id": int,
            "last_id": int,
            "anchor_hash": str,
        },
        pk="id",
    )


def _create_log_export(db: Database) -> None:
    """The OTLP log export's cursor, per instance: the last row id the collector acknowledged."""
    db["log_export"].create({"instance": str, "last_id": int, "acked_at": float}, pk="instance", not_null={"last_id"})


#: The indexes kept on ``exchanges``, each with the query it serves:
#: - ``idx_exchanges_exchange_id`` (unique): ``INSERT OR IGNORE`` deduplicates a replayed
#:   journal on it; ``content`` references it; retention's ``DELETE FROM content WHERE
#:   exchange_id IN (...)``.
#: - ``idx_exchanges_request_start``: ``llmtap report``'s ``WHERE request_start >= ? AND
#:   request_start < ?``, and ``llmtap audit verify --since/--until`` finding its row ids.
#: Verify, retention and the log export walk ``id`` (the primary key). Grouping by model,
#: provider, app or key scans the range (or reads the rollups), which those indexes never sped up.
_UNUSED_INDEXES = ("response_model", "provider", "app_id", "key_fingerprint", "response_id", "previous_response_id")


def _drop_unused_indexes(db: Database) -> None:
    """The lean row: no index that no query uses (new rows also store digests as BLOBs and
    their metadata's remainder, which needs no schema change: a value's type tells)."""
    for column in _UNUSED_INDEXES:
        db.execute(f"DROP INDEX IF EXISTS idx_exchanges_{column}")


_ROLLUP_TYPES = {
    "text": "TEXT",
    "real": "REAL",
    "integer": "INTEGER",
    "bytes": "BLOB",
    "count": "INTEGER NOT NULL",
    "sum": "INTEGER",
    "decimal": "TEXT",  # exact decimal text, added in Python
    "json": "TEXT",
}


def _create_rollups(db: Database) -> None:
    """Hourly rollups (``llmtap.audit.rollups``) for reports, backfilled from the rows here."""
    _create_rollup_table(db, "rollups")


def _create_daily_rollups(db: Database) -> None:
    """Daily rollups, the same sums by UTC day, backfilled from the rows here."""
    _create_rollup_table(db, "rollups_daily")


def _create_rollup_table(db: Database, table: str) -> None:
    # clustered by period: a report's range of hours or days is one contiguous run of the table
    db.execute(rollups.table_sql(table, (), ("hour", "key"), _ROLLUP_TYPES) + " WITHOUT ROWID")
    present = {row[1] for row in db.execute("PRAGMA table_info(exchanges)")}
    wanted = [*rollups.SOURCE_COLUMNS, "labels"]
    cursor = db.execute(f"SELECT {', '.join(c if c in present else f'NULL AS {c}' for c in wanted)} FROM exchanges")
    rows = ((row[:-1], row[-1] and json.loads(row[-1])) for row in cursor)
    add_rollups(db.conn, rollups.aggregate(rows, (), rollups.sqlite_decimal), tables=(table,))


def add_rollups(
    conn: sqlite3.Connection,
    totals: dict[rollups.Key, rollups.Values],
    known: dict | None = None,
    tables: tuple[str, ...] = tuple(rollups.PERIODS),
) -> dict[tuple[str, bytes], rollups.Values]:
    """Add hourly ``totals`` into the rollup ``tables`` (inside the caller's transaction); what
    was written (``rollups.write``)."""
    fetch = lambda sql, params: conn.execute(sql, params)  # noqa: E731
    return rollups.write_periods(totals, (), fetch, conn.executemany, sqlite=True, tables=tables, known=known)


def keep_rollups(
    conn: sqlite3.Connection, totals: dict[rollups.Key, rollups.Values], known: dict | None = None
) -> dict[tuple[str, bytes], Any]:
    """A batch's hourly ``totals`` into the rollups, closed days folded into the daily ones
    (``rollups.keep``; inside the caller's transaction); what was written."""
    fetch = lambda sql, params: conn.execute(sql, params)  # noqa: E731
    return rollups.keep(totals, (), fetch, conn.executemany, sqlite=True, known=known)


def _create_rollup_watermarks(db: Database) -> None:
    """The daily rollups' watermark (``rollups.keep``): until now they were kept per batch, so
    they are complete; the day of the latest hourly rollup is folded again (replaced) later."""
    db.execute(rollups.watermarks_table_sql(False, _ROLLUP_TYPES))
    fetch = lambda sql, params: db.conn.execute(sql, params)  # noqa: E731
    db.conn.executemany(rollups.watermark_sql(0, True, insert=True), rollups.initial_watermarks(fetch, False))


def _create_rolled_up(db: Database) -> None:
    """The last row id whose rollups are written (``rollups.HOLD_ROWS``): every row so far."""
    db.execute(rollups.rolled_up_table_sql(False, _ROLLUP_TYPES))
    db.execute(
        rollups.rolled_up_sql(0, True, insert=True),
        [db.execute("SELECT coalesce(max(id), 0) FROM exchanges").fetchone()[0]],
    )


MIGRATIONS: tuple[Callable[[Database], None], ...] = (
    _create_exchanges,
    _create_content,
    _create_journal_offsets,
    _create_pruned,
    _add_family_and_cache_writes,
    _add_pricing_columns,
    _add_anomalies,
    _add_parse_problem,
    _add_family_columns,
    _add_instance,
    _create_log_export,
    _drop_unused_indexes,
    _create_rollups,
    _create_daily_rollups,
    _create_rollup_watermarks,
    _create_rolled_up,
)


def migrate(db: Database) -> None:
    """Apply the pending migrations, each in one transaction with its user_version bump."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
        with db.atomic():
            step(db)
            db.execute(f"PRAGMA user_version = {number}")


class NotAnAuditLog(ValueError):
    """The file is neither empty nor an llmtap audit log: llmtap adds nothing to it."""


def _is_audit_log(conn: sqlite3.Connection) -> bool:
    """An empty database, or one whose ``exchanges`` table is llmtap's (it has the chain)."""
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return True
    if "exchanges" not in tables:
        return False
    columns = {row[1] for row in conn.execute("PRAGMA table_info(exchanges)")}
    return {"exchange_id", "prev_hash", "row_hash"} <= columns


def check_audit_log(path: str | os.PathLike[str]) -> None:
    """Raise ``NotAnAuditLog`` unless ``path`` is missing, empty, or an llmtap audit log.

    Read-only: a foreign file is never touched (the sidecar checks before starting the writer).
    """
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    try:
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        try:
            ours = _is_audit_log(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise NotAnAuditLog(f"{path} is not an llmtap audit log ({exc}); refusing to write to it") from exc
    if not ours:
        raise NotAnAuditLog(f"{path} is not an llmtap audit log (it holds other tables); refusing to write to it")


def connect(path: str | os.PathLike[str], *, fsync_batch: bool = False) -> Database:
    """Open (creating with mode 0600) and migrate the audit database, in WAL mode.

    Raises ``NotAnAuditLog`` for a database that is neither empty nor llmtap's.
    """
    if not os.path.exists(path):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite gives -wal/-shm the same mode
    conn = sqlite3.connect(path, isolation_level=None, timeout=2.0)
    try:
        if not _is_audit_log(conn):
            raise NotAnAuditLog(f"{path} is not an llmtap audit log (it holds other tables); refusing to write to it")
        from sqlite_utils import Database

        db = Database(conn)
        # in a new file only (it takes before the first table): a batch's rows and index
        # entries fit in fewer pages, which makes a commit about 40% cheaper
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        db.enable_wal()
        conn.execute(f"PRAGMA synchronous = {'FULL' if fsync_batch else 'NORMAL'}")
        migrate(db)
    except BaseException:
        conn.close()
        raise
    return db


def connect_readonly(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """A read-only connection (reports, verify) that works while the proxy is writing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no audit log at {path}")
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    conn.row_factory = sqlite3.Row
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'exchanges'").fetchone():
        conn.close()
        raise ValueError(f"{path} is not an llmtap audit log")
    return conn


def chain_anchor(conn: sqlite3.Connection) -> str:
    """Where the chain starts: GENESIS, or the hash of the last row retention deleted."""
    row = conn.execute("SELECT anchor_hash FROM pruned ORDER BY id DESC LIMIT 1").fetchone()
    return as_hex(row[0]) if row else GENESIS


def chain_links(conn: sqlite3.Connection, first_id: int = 0, last_id: int = 2**63 - 1) -> Iterator[Link]:
    """The rows from ``first_id`` to ``last_id`` in id order, one at a time (the cursor streams)."""
    cursor = conn.execute("SELECT * FROM exchanges WHERE id BETWEEN ? AND ? ORDER BY id", (first_id, last_id))
    names = [d[0] for d in cursor.description]
    for row in as_hashed(conn, (dict(zip(names, values)) for values in cursor)):
        yield Link(row["id"], row["exchange_id"], row["prev_hash"], row["row_hash"], body_json(row))


def verify_chain(
    conn: sqlite3.Connection,
    first_id: int = 0,
    last_id: int = 2**63 - 1,
    anchor: bytes | str | None = None,
    tick: Callable[[ChainCheck], None] | None = None,
) -> ChainCheck:
    """Walk the chain (the rows from ``first_id`` to ``last_id``) in id order from ``anchor``
    (default: the chain's own); stop at the first row that does not hash as recorded."""
    return walk_chain(chain_links(conn, first_id, last_id), chain_anchor(conn) if anchor is None else anchor, tick)


# --- the SQLite side (the writer process only) ----------------------------------------------------


_INSERT_CONTENT = "INSERT OR REPLACE INTO content VALUES (?, ?, ?, ?)"


class _Row(NamedTuple):
    insert: str
    params: list[Any]  # the last two are prev_hash and row_hash, set when the row is chained
    body: str  # canonical JSON of the hashed columns
    content: tuple[str, str | None, str | None, int] | None
    data: dict[str, Any]  # the parsed journal line


class Batch(NamedTuple):
    corrupt: list[Exception]  # lines that are not a record (a torn write): skipped
    rejected: list[Exception]  # records SQLite refused: dropped and counted
    records: list[dict[str, Any]]  # the parsed records that made a row (the spans are built from them)


class AuditStore:
    """The audit database as the writer process sees it: applies journal batches, prunes."""

    def __init__(
        self, path: str, *, fsync_batch: bool, capture_content: bool, rollup_labels: tuple[str, ...] = ()
    ) -> None:
        self.db = connect(path, fsync_batch=fsync_batch)
        self.conn = self.db.conn
        self.capture_content = capture_content
        self.rollup_labels = rollup_labels
        #: the rollup rows as this writer last committed them (the writer lock makes it the file's only writer)
        self._known_rollups: dict[tuple[str, bytes], Any] = {}
        try:
            self.types = {c.name: c.type.upper() for c in self.db["exchanges"].columns if c.name != "id"}
            self.offsets: dict[int, int] = dict(self.conn.execute("SELECT gen, offset FROM journal_offsets"))
            head = self.conn.execute("SELECT row_hash FROM exchanges ORDER BY id DESC LIMIT 1").fetchone()
            self.head = as_hex(head[0]) if head else chain_anchor(self.conn)
            #: rows ever chained (pruned ones included): the chain head's position, logged by the writer
            self.rows = (
                self.conn.execute("SELECT count(*) FROM exchanges").fetchone()[0]
                + self.conn.execute("SELECT coalesce(sum(rows), 0) FROM pruned").fetchone()[0]
            )
            #: rows inserted whose rollups are not written yet (``rollups.HOLD_ROWS``): after a
            #: crash, the rows after the last one rolled up, read back
            self._held = self._rows_not_rolled_up()
        except BaseException:
            self.conn.close()
            raise
        self._row = RowBuilder(self.types)

    def _rows_not_rolled_up(self) -> list[tuple[tuple, Any]]:
        (last_id,) = self.conn.execute(rollups.rolled_up_sql(0, True, read=True)).fetchone()
        cursor = self.conn.execute(rollups.held_rows_sql(0, True), (last_id,))
        return [(row[:-1], None if row[-1] is None else json.loads(row[-1])) for row in cursor]

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditStore:
        return cls(
            settings.db,
            fsync_batch=settings.fsync == "batch",
            capture_content=settings.capture_content,
            rollup_labels=settings.metric_labels,
        )

    def apply(self, gen: int, lines: list[bytes], end: int, *, more: bool = False) -> Batch:
        """Insert the records of ``lines`` and record ``end`` as gen's offset, atomically.

        ``more``: more journal lines wait (a backlog); the rollups of the rows inserted may then
        be held back and written with later batches' (``rollups.HOLD_ROWS``). The garbage
        collector is paused meanwhile: the rows a batch holds until its end set off a few
        collections per batch, about 2% of the time.
        """
        collecting = gc.isenabled()
        gc.disable()
        try:
            rows, corrupt, rejected = self._build(lines)
            with self.db.atomic():
                inserted = rows
                head = self._insert_batch(rows)
                if head is None:
                    inserted = []
                    head = self._insert_each(rows, rejected, inserted)
                held = [*self._held]
                held += [(rollups.picker(insert_columns(r.insert))(r.params), r.data.get("labels")) for r in inserted]
                released = rollups.release(held, more)
                written = self._roll_up(held) if released else {}
                self.conn.execute("INSERT OR REPLACE INTO journal_offsets (gen, offset) VALUES (?, ?)", (gen, end))
            self._held = [] if released else held  # committed
            rollups.remember(self._known_rollups, written)
        finally:
            if collecting:
                gc.enable()
        self.head, self.offsets[gen] = head, end
        self.rows += len(inserted)
        return Batch(corrupt, rejected, [row.data for row in rows])

    def _roll_up(self, held: list[tuple[tuple, Any]]) -> dict[tuple[str, bytes], Any]:
        """Write the rollups of the ``held`` rows, and that every row so far is rolled up
        (inside the caller's transaction); what was written."""
        totals = rollups.aggregate(held, self.rollup_labels, rollups.sqlite_decimal)
        written = keep_rollups(self.conn, totals, self._known_rollups)
        last_id = self.conn.execute("SELECT max(id) FROM exchanges").fetchone()[0]
        self.conn.execute(rollups.rolled_up_sql(0, True), (last_id,))
        return written

    def release_rollups(self) -> None:
        """Write the rollups of the rows held back, if any (before pruning, and on close)."""
        if self._held:
            with self.db.atomic():
                written = self._roll_up(self._held)
            self._held = []
            rollups.remember(self._known_rollups, written)

    def _build(self, lines: list[bytes]) -> tuple[list[_Row], list[Exception], list[Exception]]:
        """The rows of ``lines``, the lines that are not a record, the records that are no row."""
        rows, corrupt, rejected = [], [], []
        for line in lines:
            try:
                data, clean = read_record(line)
            except ValueError as exc:
                corrupt.append(exc)
                continue
            try:
                insert, params, body = self._row(data, clean=clean)
                for position, pack in _packing(insert):
                    params[position] = pack(params[position])
                content = content_row(data, self.capture_content)
                if content is not None:
                    content = (packed_id("exchange_id", content[0]), *content[1:])
                rows.append(_Row(insert, params, body, content, data))
            except Exception as exc:  # a record that cannot become a row must not block the rest
                rejected.append(exc)
        return rows, corrupt, rejected

    def _insert_batch(self, rows: list[_Row]) -> str | None:
        """Chain ``rows`` as if all were new and insert them with an ``executemany`` per run of
        one INSERT; the new head, or None, with nothing written, when one was already there (a
        replay) or faulted."""
        head = as_digest(self.head)
        for row in rows:
            head = chain_digest(head, row.body)
            row.params[-2:] = IMPLIED, head
        self.conn.execute("SAVEPOINT batch")
        try:
            inserted = sum(
                self.conn.executemany(insert, [row.params for row in run]).rowcount
                for insert, run in itertools.groupby(rows, operator.attrgetter("insert"))
            )
        except Exception as exc:
            if isinstance(exc, sqlite3.Error) and not isinstance(exc, _ROW_SQL_FAULTS):
                raise  # locked, read-only, I/O: the whole batch is retried
            inserted = None
        if inserted != len(rows):
            self.conn.execute("ROLLBACK TO batch")
            self.conn.execute("RELEASE batch")
            return None
        self.conn.execute("RELEASE batch")
        self.conn.executemany(_INSERT_CONTENT, [row.content for row in rows if row.content is not None])
        return as_hex(head)

    def _insert_each(self, rows: list[_Row], rejected: list[Exception], inserted: list[_Row]) -> str:
        """Insert ``rows`` one by one, chaining only those inserted (added to ``inserted``); the new head."""
        head = as_digest(self.head)
        for row in rows:
            row.params[-2:] = IMPLIED, chain_digest(head, row.body)
            try:
                if self.conn.execute(row.insert, row.params).rowcount != 1:
                    continue  # already there (a replay): the chain is untouched
            except sqlite3.Error as exc:
                if not isinstance(exc, _ROW_SQL_FAULTS):
                    raise  # locked, read-only, I/O: the whole batch is retried
                rejected.append(exc)
                continue
            except Exception as exc:
                rejected.append(exc)
                continue
            head = row.params[-1]
            inserted.append(row)
            if row.content is not None:
                self.conn.execute(_INSERT_CONTENT, row.content)
        return as_hex(head)

    def forget(self, gen: int) -> None:
        """Drop a retired generation's offset (before its file goes: a replay is deduplicated)."""
        with self.db.atomic():
            self.conn.execute("DELETE FROM journal_offsets WHERE gen = ?", (gen,))
        self.offsets.pop(gen, None)

    def prune(self, cutoff: float, batch: int, *, hold_for_export: bool = False) -> int:
        """Delete up to ``batch`` of the oldest rows started before ``cutoff``; ledger the anchor.

        Called every writer cycle: when the oldest row is recent it costs one primary-key lookup.
        Once an OTLP log export cursor exists, the newest row is never deleted (SQLite would
        reuse its id, below the cursor); with ``hold_for_export`` no row the collector has not
        acknowledged is deleted either.
        """
        first = self.conn.execute("SELECT request_start FROM exchanges ORDER BY id LIMIT 1").fetchone()
        if first is None or (first[0] or 0.0) >= cutoff:
            return 0
        last = 2**63 - 1  # the largest row id
        if self.conn.execute("SELECT 1 FROM log_export LIMIT 1").fetchone() or hold_for_export:
            newest = self.conn.execute("SELECT max(id) FROM exchanges").fetchone()[0]
            acked = self.conn.execute("SELECT min(last_id) FROM log_export").fetchone()[0] or 0
            last = min(newest - 1, acked) if hold_for_export else newest - 1
        rows = self.conn.execute(
            "SELECT id, request_start, row_hash FROM exchanges WHERE id <= ? ORDER BY id LIMIT ?", (last, batch)
        ).fetchall()
        old = list(takewhile(lambda r: (r[1] or 0.0) < cutoff, rows))  # a prefix keeps the chain whole
        if not old:
            return 0
        self.release_rollups()  # a row is rolled up before it goes
        last_id = old[-1][0]
        with self.db.atomic():
            self.conn.execute(
                "DELETE FROM content WHERE exchange_id IN (SELECT exchange_id FROM exchanges WHERE id <= ?)",
                (last_id,),
            )
            self.conn.execute("DELETE FROM exchanges WHERE id <= ?", (last_id,))
            self.conn.execute(
                "INSERT INTO pruned (pruned_at, cutoff, rows, first_id, last_id, anchor_hash) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), cutoff, len(old), old[0][0], last_id, as_hex(old[-1][2])),
            )
        return len(old)

    def prune_rollups(self, cutoff: float) -> int:
        """Delete the rollups of periods that ended before ``cutoff``."""
        deleted = 0
        for table, seconds in rollups.PERIODS.items():
            old = (cutoff - seconds,)
            if self.conn.execute(f"SELECT 1 FROM {table} WHERE hour <= ? LIMIT 1", old).fetchone():
                with self.db.atomic():  # else (every writer cycle) one index look-up
                    deleted += self.conn.execute(f"DELETE FROM {table} WHERE hour <= ?", old).rowcount
                self._known_rollups.clear()
        return deleted

    # --- the OTLP log export's cursor (llmtap.audit.logexport): rows after it await acknowledgement ---

    #: The cursor's key: a SQLite file holds one llmtap's rows (``instance`` stays that of the chain head).
    export_key = "local"

    def log_export_position(self) -> tuple[int, int]:
        """The id of the last row acknowledged (0: none yet) and how many rows follow it."""
        row = self.conn.execute("SELECT last_id FROM log_export WHERE instance = ?", (self.export_key,)).fetchone()
        cursor = row[0] if row else 0
        return cursor, self.conn.execute("SELECT count(*) FROM exchanges WHERE id > ?", (cursor,)).fetchone()[0]

    def rows_after(
        self, row_id: int, limit: int, *, content: bool
    ) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        """Up to ``limit`` rows after ``row_id``, oldest first, each with its ``content`` row when
        ``content`` is asked for and there is one."""
        join = "LEFT JOIN content c ON c.exchange_id = e.exchange_id" if content else ""
        extra = ", c.input_messages, c.output_messages, c.truncated" if content else ""
        cursor = self.conn.execute(
            f"SELECT e.*{extra} FROM exchanges e {join} WHERE e.id > ? ORDER BY e.id LIMIT ?", (row_id, limit)
        )
        names = [d[0] for d in cursor.description]
        split = len(names) - 3 if content else len(names)
        found = []
        for values in cursor:
            text = dict(zip(names[split:], values[split:]))
            has_text = text.get("input_messages") is not None or text.get("output_messages") is not None
            found.append((dict(zip(names[:split], values[:split])), text if has_text else None))
        return list(zip(as_hashed(self.conn, (row for row, _ in found)), (text for _, text in found)))

    def advance_log_export(self, last_id: int) -> None:
        """Record that the collector acknowledged every row up to ``last_id`` (never backwards)."""
        with self.db.atomic():
            self.conn.execute(
                "INSERT INTO log_export (instance, last_id, acked_at) VALUES (?, ?, ?) ON CONFLICT (instance) "
                "DO UPDATE SET last_id = max(last_id, excluded.last_id), acked_at = excluded.acked_at",
                (self.export_key, last_id, time.time()),
            )

    def close(self) -> None:
        try:
            self.release_rollups()
        finally:
            self.conn.close()


#: This module's store, for the registry (``llmtap.audit.stores``).
Store = AuditStore


def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors after which the writer backs off and retries (locked, read-only, I/O)."""
    return (sqlite3.Error,)
