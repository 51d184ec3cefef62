"""The PostgreSQL audit store: one database, the system of record for a fleet of llmtaps.

Each llmtap (an *instance*: a random id kept in its journal directory) applies its own
journal here exactly as it would to SQLite: in batches, each one transaction that inserts the
rows (``COPY``) and records how far the journal has been applied (``journal_positions``), so
a restart resumes exactly once. Every instance has its own hash chain (``instance_id``; the
chain's rules are ``llmtap.audit.rows``), so forty sidecars never contend for one chain head;
a per-instance advisory lock keeps two writers of one instance from interleaving.

Exactly once: an exchange id already stored is a no-op only when the stored row hashes to
its stored ``row_hash`` with this record's body (the same record, replayed); anything else
is a conflict, counted and logged, never a silent skip.

Schema made for the engine: money ``numeric`` (written from the exact decimal a value was
hashed as), ``jsonb`` for the structured columns, the epoch seconds that are hashed as
``double precision`` plus ``timestamptz`` columns generated from them (``request_at``,
``response_at``) for SQL and dashboards, the chain's hashes as 32-byte ``bytea`` digests
(``prev_digest``, ``row_digest``; rows of an older llmtap keep their text ``prev_hash``,
``row_hash``, and a row has one pair or the other). Migrations (``migrate``) are numbered, transactional
and run under an advisory lock by an owner role; the columns follow the SQLite schema (a new
record field is a new nullable column in both). Sidecars need only INSERT and SELECT on the
rows (and DELETE on ``exchanges``/``content`` when retention is on), plus UPDATE on
``rollups``, ``rollups_daily`` and ``rollup_watermarks``: each adds its batches into its own
instance's rollup rows and folds its own closed days (``rollups.keep``).
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import logging
import operator
import os
import secrets
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from llmtap.audit import rollups
from llmtap.audit.rows import (
    GENESIS,
    JSON_COLUMNS,
    UNHASHED,
    ChainCheck,
    Link,
    RowBuilder,
    as_digest,
    as_hex,
    body_json,
    chain_digest,
    content_row,
    insert_columns,
    link_fault,
    read_record,
    walk_chain,
)
from llmtap.config import Settings
from llmtap.record import canonical_json

log = logging.getLogger("llmtap")

#: The advisory lock key of migrations (any constant; "llmtap" in ASCII).
MIGRATION_LOCK = 0x6C6C6D746170
INSTANCE_FILE = "instance-id"


def psycopg():
    """psycopg 3, imported only when a PostgreSQL URL is used (the ``postgres`` extra)."""
    try:
        import psycopg as module
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise RuntimeError("a PostgreSQL --db needs psycopg: pip install 'llmtap[postgres]'") from exc
    return module


def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors after which the writer backs off and retries the batch (server gone, no rights)."""
    pg = psycopg()
    return (pg.OperationalError, pg.InterfaceError, pg.errors.InsufficientPrivilege, pg.errors.UndefinedTable)


# --- schema ---------------------------------------------------------------------------------------


@functools.cache
def sqlite_types() -> dict[str, str]:
    """The ``exchanges`` columns as the SQLite schema declares them (the one list of columns)."""
    from sqlite_utils import Database

    from llmtap.audit.sqlite import migrate as migrate_sqlite

    db = Database(memory=True)
    migrate_sqlite(db)
    types = {c.name: c.type.upper() for c in db["exchanges"].columns if c.name not in UNHASHED}
    db.conn.close()
    return types


def pg_type(name: str, kind: str) -> str:
    """The PostgreSQL type of a hashed column."""
    if name in JSON_COLUMNS:
        return "jsonb"
    if name.endswith("_usd"):
        return "numeric"
    return {"INTEGER": "bigint", "REAL": "double precision"}.get(kind, "text")


_BASE = """
CREATE TABLE exchanges (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id text NOT NULL,
    exchange_id text NOT NULL UNIQUE,
    request_start double precision,
    response_end double precision,
    json_exact text,
    prev_hash text NOT NULL,
    row_hash text NOT NULL,
    -- NULL for a time no timestamptz holds: an odd value costs this column, never the row
    request_at timestamptz GENERATED ALWAYS AS (
        CASE WHEN request_start BETWEEN -2.0e11 AND 9.2e12 THEN to_timestamp(request_start) END) STORED,
    response_at timestamptz GENERATED ALWAYS AS (
        CASE WHEN response_end BETWEEN -2.0e11 AND 9.2e12 THEN to_timestamp(response_end) END) STORED
);
CREATE INDEX exchanges_chain ON exchanges (instance_id, id);
CREATE INDEX exchanges_request_start ON exchanges (request_start);
CREATE TABLE content (
    exchange_id text PRIMARY KEY REFERENCES exchanges (exchange_id),
    input_messages text,
    output_messages text,
    truncated integer
);
CREATE TABLE journal_positions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id text NOT NULL,
    gen bigint NOT NULL,
    "offset" bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX journal_positions_instance ON journal_positions (instance_id, gen, id);
CREATE TABLE pruned (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id text NOT NULL,
    pruned_at timestamptz NOT NULL DEFAULT now(),
    cutoff double precision,
    rows bigint,
    first_id bigint,
    last_id bigint,
    anchor_hash text NOT NULL
);
CREATE INDEX pruned_instance ON pruned (instance_id, id);
"""


def _add_columns(cur: Any) -> None:
    """Every column of the SQLite schema, with its engine type (idempotent: a new record field
    becomes a new nullable column, so old rows keep their hashes)."""
    for name, kind in sqlite_types().items():
        cur.execute(f"ALTER TABLE exchanges ADD COLUMN IF NOT EXISTS {name} {pg_type(name, kind)}")


def _create_log_export(cur: Any) -> None:
    """The OTLP log export's cursor, per instance: the last row id the collector acknowledged.

    Append-only, like ``journal_positions``: a sidecar needs only INSERT and SELECT; the
    cursor is the largest ``last_id`` of its instance.
    """
    cur.execute(
        "CREATE TABLE IF NOT EXISTS log_export (instance_id text NOT NULL, last_id bigint NOT NULL, "
        "acked_at timestamptz NOT NULL DEFAULT now())"
    )
    cur.execute("CREATE INDEX IF NOT EXISTS log_export_instance_last ON log_export (instance_id, last_id)")


#: The indexes the lean row drops: no query uses them (grouping reads the rollups or scans the range).
_UNUSED_INDEXES = ("response_model", "provider", "app_id", "key_fingerprint", "response_id", "previous_response_id")


def _lean_rows(cur: Any) -> None:
    """The lean row: hashes as 32-byte ``bytea`` digests (``prev_digest``, ``row_digest``; the
    old rows keep their text ``prev_hash``/``row_hash``, now nullable: a row has one pair or
    the other), and only the indexes a query uses:

    - ``exchanges_exchange_id_key`` (unique): the replay check ``exchange_id = ANY(...)``;
    - ``exchanges_chain (instance_id, id)``: verify, retention, the chain head, the log export;
    - ``exchanges_request_start``: ``llmtap report``'s and ``verify --since/--until``'s ranges.
    """
    cur.execute("ALTER TABLE exchanges ADD COLUMN IF NOT EXISTS prev_digest bytea")
    cur.execute("ALTER TABLE exchanges ADD COLUMN IF NOT EXISTS row_digest bytea")
    cur.execute("ALTER TABLE exchanges ALTER COLUMN prev_hash DROP NOT NULL, ALTER COLUMN row_hash DROP NOT NULL")
    for column in _UNUSED_INDEXES:
        cur.execute(f"DROP INDEX IF EXISTS exchanges_{column}")


_ROLLUP_TYPES = {
    "text": "text",
    "real": "double precision",
    "integer": "bigint",
    "bytes": "bytea",
    "count": "integer NOT NULL",
    "sum": "numeric",  # a sum of bigints may not fit one
    "decimal": "numeric",
    "json": "jsonb",
}


def _create_rollups(cur: Any) -> None:
    """Hourly rollups per instance (``llmtap.audit.rollups``), backfilled from the rows here."""
    _create_rollup_table(cur, "rollups")


def _create_daily_rollups(cur: Any) -> None:
    """Daily rollups per instance, the same sums by UTC day, backfilled from the rows here."""
    _create_rollup_table(cur, "rollups_daily")


def _create_rollup_table(cur: Any, table: str) -> None:
    if cur.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
        cur.execute(rollups.table_sql(table, ("instance_id",), ("instance_id", "key"), _ROLLUP_TYPES))
        cur.execute(f"CREATE INDEX {table}_hour ON {table} (hour)")
        backfill(cur.connection, tables=(table,))


def backfill(conn: Any, instance: str | None = None, tables: Iterable[str] = tuple(rollups.PERIODS)) -> None:
    """Add the rollups of the stored rows (of one instance, or all) into rollup ``tables``."""
    wanted = [*rollups.SOURCE_COLUMNS, "labels"]
    where = "WHERE instance_id = %s" if instance else ""
    with conn.cursor(name=f"backfill_{secrets.token_hex(4)}") as cur:
        cur.execute(
            f"SELECT instance_id, {', '.join(wanted)} FROM exchanges {where} ORDER BY instance_id",
            (instance,) if instance else (),
        )
        for owner, rows in itertools.groupby(cur, operator.itemgetter(0)):
            counted = ((row[1:-1], row[-1]) for row in rows)
            add_rollups(conn, owner, rollups.aggregate(counted, (), rollups.postgres_decimal), tables)


def add_rollups(
    conn: Any,
    instance: str,
    totals: dict[rollups.Key, rollups.Values],
    tables: Iterable[str] = tuple(rollups.PERIODS),
    known: dict | None = None,
) -> dict[tuple[str, bytes], rollups.Values]:
    """Add hourly ``totals`` into an instance's rollup ``tables`` (inside the caller's
    transaction); what was written (``rollups.write``)."""
    with conn.cursor() as cur:
        fetch = lambda sql, params: cur.execute(sql, params).fetchall()  # noqa: E731
        return rollups.write_periods(
            totals, (instance,), fetch, _executemany(cur), sqlite=False, tables=tables, known=known
        )


def keep_rollups(
    conn: Any, instance: str, totals: dict[rollups.Key, rollups.Values], *, known: dict | None, may_delete: bool
) -> dict[tuple[str, bytes], Any]:
    """A batch's hourly ``totals`` into an instance's rollups, its closed days folded into the
    daily ones (``rollups.keep``; inside the caller's transaction); what was written."""
    with conn.cursor() as cur:
        fetch = lambda sql, params: cur.execute(sql, params).fetchall()  # noqa: E731
        return rollups.keep(
            totals, (instance,), fetch, _executemany(cur), sqlite=False, known=known, may_delete=may_delete
        )


def _executemany(cur: Any) -> Any:
    """``cur.executemany`` returning the cursor (its ``rowcount``: the rows of every statement)."""

    def run(sql: str, params: list[list[Any]]) -> Any:
        cur.executemany(sql, params)
        return cur

    return run


def _create_rollup_watermarks(cur: Any) -> None:
    """Each instance's daily-rollup watermark (``rollups.keep``): until now daily rollups were
    kept per batch, so they are complete; each instance's latest day is folded again later."""
    if cur.execute("SELECT to_regclass(%s)", (rollups.WATERMARKS,)).fetchone()[0] is None:
        # rows without a start time were added up by day under hour NaN (-inf // 86400), which
        # sorts after every hour here: they are the hourly rows of hour -inf, whose day is -inf
        cur.execute("DELETE FROM rollups_daily WHERE hour = 'NaN'")
        cur.execute("INSERT INTO rollups_daily SELECT * FROM rollups WHERE hour = '-Infinity' ON CONFLICT DO NOTHING")
        cur.execute(rollups.watermarks_table_sql(True, _ROLLUP_TYPES))
        fetch = lambda sql, params: cur.execute(sql, params).fetchall()  # noqa: E731
        cur.executemany(rollups.watermark_sql(1, False, insert=True), rollups.initial_watermarks(fetch, True))


def set_watermark(conn: Any, instance: str) -> None:
    """An instance whose rollups were all just added to both tables (an import): its daily
    rollups are complete, its latest day included (a row of that day written later is a late
    row, added to both); an instance that writes no more never holds the report's split back."""
    with conn.cursor() as cur:
        found = cur.execute(
            "SELECT max(hour) FROM rollups WHERE instance_id = %s AND hour > -1e300", (instance,)
        ).fetchone()[0]
        if found is not None:
            cur.execute(
                rollups.watermark_sql(1, False, insert=True) + " ON CONFLICT (instance_id) DO NOTHING",
                (instance, rollups.period_of(float(found), rollups.DAY) + rollups.DAY),
            )


def _create_rolled_up(cur: Any) -> None:
    """Each instance's last row id whose rollups are written (``rollups.HOLD_ROWS``): all its rows so far."""
    if cur.execute("SELECT to_regclass(%s)", (rollups.ROLLED_UP,)).fetchone()[0] is None:
        cur.execute(rollups.rolled_up_table_sql(True, _ROLLUP_TYPES | {"integer": "bigint"}))
        cur.execute(
            f"INSERT INTO {rollups.ROLLED_UP} (instance_id, last_id) "
            "SELECT instance_id, max(id) FROM exchanges GROUP BY instance_id"
        )


#: Numbered steps; ``llmtap_schema`` holds how many were applied. ``_add_columns`` re-runs
#: whenever a column is missing (it is idempotent).
MIGRATIONS = (
    lambda cur: cur.execute(_BASE),
    _add_columns,
    _create_log_export,
    _lean_rows,
    _create_rollups,
    _create_daily_rollups,
    _create_rollup_watermarks,
    _create_rolled_up,
)


def _columns(conn: Any) -> set[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'exchanges' "
        "AND table_schema = current_schema()"
    ).fetchall()
    return {row[0] for row in rows}


def schema_current(conn: Any) -> bool:
    """True when the schema has every migration and every column this llmtap writes."""
    if conn.execute("SELECT to_regclass('llmtap_schema')").fetchone()[0] is None:
        return False
    version = conn.execute("SELECT max(version) FROM llmtap_schema").fetchone()[0] or 0
    return version >= len(MIGRATIONS) and set(sqlite_types()) <= _columns(conn)


def migrate(conn: Any, grant: Iterable[str] = ()) -> list[int]:
    """Apply pending migrations, each in its own transaction, under an advisory lock; the
    numbers applied. ``grant``: roles given what a sidecar needs."""
    applied = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS llmtap_schema (version integer PRIMARY KEY, applied_at timestamptz)")
        version = conn.execute("SELECT coalesce(max(version), 0) FROM llmtap_schema").fetchone()[0]
        for number, step in enumerate(MIGRATIONS, start=1):
            if number > version or (step is _add_columns and not set(sqlite_types()) <= _columns(conn)):
                with conn.transaction():  # a savepoint: one step, all or nothing
                    with conn.cursor() as cur:
                        step(cur)
                    conn.execute(
                        "INSERT INTO llmtap_schema VALUES (%s, now()) ON CONFLICT (version) DO NOTHING", (number,)
                    )
                applied.append(number)
        for role in grant:
            ident = psycopg().sql.Identifier(role)
            conn.execute(
                psycopg()
                .sql.SQL(
                    "GRANT SELECT, INSERT ON exchanges, content, journal_positions, pruned, llmtap_schema, log_export "
                    "TO {}"
                )
                .format(ident)
            )
            # rollups are added to and a closed day's daily rows replaced (UPDATE), the instance's
            # watermark and its last rolled-up row moved on; the rows themselves stay INSERT-only
            conn.execute(
                psycopg()
                .sql.SQL("GRANT SELECT, INSERT, UPDATE ON rollups, rollups_daily, {}, {} TO {}")
                .format(
                    psycopg().sql.Identifier(rollups.WATERMARKS), psycopg().sql.Identifier(rollups.ROLLED_UP), ident
                )
            )
    return applied


def connect(url: str, *, autocommit: bool = True) -> Any:
    """A connection (libpq URL, conninfo or ``service=``; the password from the environment or
    ``.pgpass``), failing within seconds when the server is unreachable."""
    return psycopg().connect(url, autocommit=autocommit, connect_timeout=5, application_name="llmtap")


def connect_migrated(url: str) -> Any:
    """A connection to a current schema: migrated now when it is not and this role may."""
    conn = connect(url)
    try:
        if not schema_current(conn):
            try:
                migrate(conn)
            except psycopg().errors.InsufficientPrivilege as exc:
                raise psycopg().errors.InsufficientPrivilege(
                    "the audit schema is missing or old and this role may not migrate it: "
                    "run `llmtap audit migrate --db URL` as the owner"
                ) from exc
    except BaseException:
        conn.close()
        raise
    return conn


# --- instances ------------------------------------------------------------------------------------


def instance_id(journal_dir: str) -> str:
    """This instance's id: read from the journal directory, created there (randomly) on first
    start. A pod that comes back with the same journal volume is the same instance."""
    path = os.path.join(journal_dir, INSTANCE_FILE)
    try:
        with open(path) as f:
            found = f.read().strip()
        if found:
            return found
    except FileNotFoundError:
        pass
    os.makedirs(journal_dir, mode=0o700, exist_ok=True)
    new = secrets.token_hex(8)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(new + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # never replaces an id another process wrote first
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    with open(path) as f:
        return f.read().strip()


# --- the writer side ----------------------------------------------------------------------------


class Batch(NamedTuple):
    corrupt: list[Exception]  # lines that are not a record (a torn write): skipped
    rejected: list[Exception]  # records the database refused: dropped and counted
    records: list[dict[str, Any]]  # the parsed records that made a row (the spans are built from them)
    conflicts: list[str]  # exchange ids stored already with different contents: counted, logged


class _Row(NamedTuple):
    values: list[Any]  # in COPY column order; prev_digest and row_digest last
    body: str
    content: tuple[str, str | None, str | None, int] | None
    data: dict[str, Any]


class PostgresStore:
    """The audit database as one instance's writer sees it: applies journal batches, prunes."""

    def __init__(self, url: str, instance: str, *, capture_content: bool, rollup_labels: tuple[str, ...] = ()) -> None:
        self.instance = instance
        self.capture_content = capture_content
        self.rollup_labels = rollup_labels
        #: this instance's rollup rows as its writer last committed them (the journal's writer lock
        #: makes this the instance's only writer)
        self._known_rollups: dict[tuple[str, bytes], Any] = {}
        self._written: dict[tuple[str, bytes], Any] = {}  # by the batch's transaction
        self.conn = connect_migrated(url)
        try:
            self.types = {name: kind for name, kind in sqlite_types().items()}
            self.columns = ["instance_id", *sorted(self.types), "json_exact", "prev_digest", "row_digest"]
            self._json_positions = [(i, name) for i, name in enumerate(self.columns) if name in JSON_COLUMNS]
            self._copy = f"COPY exchanges ({', '.join(self.columns)}) FROM STDIN"
            self.offsets: dict[int, int] = dict(
                self.conn.execute(
                    'SELECT DISTINCT ON (gen) gen, "offset" FROM journal_positions WHERE instance_id = %s '
                    "ORDER BY gen, id DESC",
                    (instance,),
                ).fetchall()
            )
            self.head, self.rows = chain_head(self.conn, instance)
            #: a stale daily row no fold overwrites is deleted, or zeroed by a role that may not DELETE
            self._may_delete_daily = self.conn.execute(
                "SELECT has_table_privilege('rollups_daily', 'DELETE')"
            ).fetchone()[0]
            #: rows inserted whose rollups are not written yet (``rollups.HOLD_ROWS``): after a
            #: crash, the rows after the last one rolled up, read back
            self._held = self._rows_not_rolled_up()
            self._more = False
        except BaseException:
            self.conn.close()
            raise
        self._row = RowBuilder(self.types)
        self._may_delete = self._may_prune = True  # until the role says otherwise
        self._layout = functools.lru_cache(maxsize=256)(self._arrange)

    @classmethod
    def from_settings(cls, settings: Settings) -> PostgresStore:
        return cls(
            settings.db,
            instance_id(settings.journal_dir),
            capture_content=settings.capture_content,
            rollup_labels=settings.metric_labels,
        )

    def _arrange(self, insert: str) -> Any:
        """A function from ``[instance, *values of the INSERT's columns, prev digest, row digest]``
        to the COPY row (NULL for the other columns): one C call per row."""
        names = insert_columns(insert)
        given = {"instance_id": 0, **{name: i + 1 for i, name in enumerate(names)}}
        given["prev_digest"], given["row_digest"] = len(names) + 1, len(names) + 2  # json_exact: NULL
        blank = len(names) + 3  # the index of the None appended
        getter = operator.itemgetter(*[given.get(column, blank) for column in self.columns])
        return lambda values: getter([*values, None])

    def _rows_not_rolled_up(self) -> list[tuple[tuple, Any]]:
        with self.conn.transaction():
            self.conn.execute(
                rollups.rolled_up_sql(1, False, insert=True),  # a new instance: none of its rows yet
                (self.instance, self._last_id()),
            )
            (last_id,) = self.conn.execute(rollups.rolled_up_sql(1, False, read=True), (self.instance,)).fetchone()
            found = self.conn.execute(rollups.held_rows_sql(1, False), (self.instance, last_id)).fetchall()
        return [(row[:-1], row[-1]) for row in found]

    def _last_id(self) -> int:
        found = self.conn.execute("SELECT max(id) FROM exchanges WHERE instance_id = %s", (self.instance,)).fetchone()
        return found[0] or 0

    def apply(self, gen: int, lines: list[bytes], end: int, *, more: bool = False) -> Batch:
        """Insert the records of ``lines`` and record ``end`` as gen's offset, in one transaction.
        ``more``: more journal lines wait; the rollups may wait for the next batches (``rollups.HOLD_ROWS``)."""
        collecting = gc.isenabled()
        gc.disable()
        corrupt: list[Exception] = []
        rejected: list[Exception] = []
        conflicts: list[str] = []
        pg = psycopg()
        self._written, self._more, self._held_after = {}, more, self._held
        try:
            try:  # optimistic: rows streamed as built, no look-up (an id already stored is rare: a replay)
                head, kept = self._stream(gen, end, lines, corrupt, rejected)
            except (pg.DataError, pg.IntegrityError) as exc:
                corrupt.clear()
                rejected.clear()
                rows = list(self._rows(lines, corrupt, rejected))
                try:
                    if not isinstance(exc, pg.errors.UniqueViolation):
                        raise exc
                    head, kept = self._transaction(gen, end, rows, conflicts, check=True, each=False)
                except (pg.DataError, pg.IntegrityError):  # a value the server refuses: row by row
                    conflicts.clear()
                    head, kept = self._transaction(gen, end, rows, conflicts, check=True, each=True, rejected=rejected)
        finally:
            if collecting:
                gc.enable()
        self._held = self._held_after  # committed
        rollups.remember(self._known_rollups, self._written)
        self.rows += len(kept)
        self.head, self.offsets[gen] = head, end
        return Batch(corrupt, rejected, [row.data for row in kept], conflicts)

    def _stream(
        self, gen: int, end: int, lines: list[bytes], corrupt: list[Exception], rejected: list[Exception]
    ) -> tuple[str, list[_Row]]:
        """One transaction: every row COPYed as soon as it is built and chained (the server
        stores row n while this process builds row n+1), then the offset."""
        head = as_digest(self.head)
        kept: list[_Row] = []
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.instance,))
            with self.conn.cursor() as cur, cur.copy(self._copy) as copy:
                for row in self._rows(lines, corrupt, rejected):
                    row.values[-2:] = head, chain_digest(head, row.body)
                    head = row.values[-1]
                    copy.write_row(row.values)
                    kept.append(row)
            self._finish(gen, end, kept)
        return as_hex(head), kept

    def _finish(self, gen: int, end: int, kept: list[_Row]) -> None:
        """The batch's content rows, its rollups and its journal position (inside its transaction)."""
        source = rollups.picker(tuple(self.columns))
        held = [*self._held, *((source(row.values), row.data.get("labels")) for row in kept)]
        released = rollups.release(held, self._more)
        self._written = self._roll_up(held) if released else {}
        self._held_after = [] if released else held
        contents = [row.content for row in kept if row.content is not None]
        if contents:
            with self.conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO content VALUES (%s, %s, %s, %s) ON CONFLICT (exchange_id) DO NOTHING", contents
                )
        self.conn.execute(
            'INSERT INTO journal_positions (instance_id, gen, "offset") VALUES (%s, %s, %s)',
            (self.instance, gen, end),
        )

    def _transaction(
        self,
        gen: int,
        end: int,
        rows: list[_Row],
        conflicts: list[str],
        *,
        check: bool,
        each: bool,
        rejected: list[Exception] | None = None,
    ) -> tuple[str, list[_Row]]:
        """One transaction: the new rows (COPY, or one by one after a row fault), the offset."""
        head = as_digest(self.head)
        kept: list[_Row] = []
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.instance,))
            stored = self._stored([row.data["exchange_id"] for row in rows]) if check else {}
            for row in rows:
                found = stored.get(row.data["exchange_id"])
                if found is not None:
                    if link_fault(as_digest(found[0]), found[0], found[1], row.body):
                        conflicts.append(row.data["exchange_id"])
                    continue  # the same record, replayed: a no-op
                row.values[-2:] = head, chain_digest(head, row.body)
                if each:
                    try:
                        with self.conn.transaction():
                            self.conn.execute(self._insert_one, self._exact_numerics(row.values))
                    except (psycopg().DataError, psycopg().IntegrityError) as exc:
                        rejected.append(exc)
                        continue
                head = row.values[-1]
                kept.append(row)
            if kept and not each:
                with self.conn.cursor() as cur, cur.copy(self._copy) as copy:
                    for row in kept:
                        copy.write_row(row.values)
            self._finish(gen, end, kept)
        return as_hex(head), kept

    def _exact_numerics(self, values: list[Any]) -> list[Any]:
        """A float bound to a numeric column would pass through float8 and keep 15 digits
        (3.4000000000000005e-06 stored as 0.0000034, no longer the value hashed); as its repr
        text it is stored exactly, as COPY stores it."""
        return [repr(v) if i in self._numeric_positions and isinstance(v, float) else v for i, v in enumerate(values)]

    @functools.cached_property
    def _numeric_positions(self) -> frozenset[int]:
        return frozenset(
            i
            for i, name in enumerate(self.columns)
            if name in self.types and pg_type(name, self.types[name]) == "numeric"
        )

    @functools.cached_property
    def _insert_one(self) -> str:
        return f"INSERT INTO exchanges ({', '.join(self.columns)}) VALUES ({', '.join(['%s'] * len(self.columns))})"

    def _stored(self, ids: list[str]) -> dict[str, tuple[Any, Any]]:
        """The stored links (prev, hash) of these exchange ids, in their stored format."""
        if not ids:
            return {}
        found = self.conn.execute(
            "SELECT exchange_id, coalesce(prev_digest, convert_to(prev_hash, 'UTF8')), row_digest, row_hash "
            "FROM exchanges WHERE exchange_id = ANY(%s)",
            (ids,),
        ).fetchall()
        return {
            exchange_id: (prev, digest) if digest is not None else (prev.decode(), hashed)
            for exchange_id, prev, digest, hashed in found
        }

    def _rows(self, lines: list[bytes], corrupt: list[Exception], rejected: list[Exception]) -> Iterator[_Row]:
        """The rows of ``lines``, as they are built; the lines that are not a record go to
        ``corrupt``, the records that make no row to ``rejected``."""
        for line in lines:
            try:
                data, clean = read_record(line)
            except ValueError as exc:
                corrupt.append(exc)
                continue
            try:
                if b"\\u0000" in line:  # JSON escapes every NUL; PostgreSQL text holds none
                    data = _without_nul(data)  # U+FFFD instead, before hashing: the row is what was hashed
                    clean = False
                insert, params, body = self._row(data, clean=clean)
                values = list(self._layout(insert)([self.instance, *params]))
                if b"e+" in line or b"-0.0" in line:  # maybe a float jsonb cannot give back as written
                    exact = {
                        name: values[i]
                        for i, name in self._json_positions
                        if values[i] is not None and ("e+" in values[i] or "-0.0" in values[i])
                    }
                    values[-3] = json.dumps(exact, ensure_ascii=False) if exact else None
                row = _Row(values, body, content_row(data, self.capture_content), data)
            except Exception as exc:
                rejected.append(exc)
                continue
            yield row

    def forget(self, gen: int) -> None:
        """A retired generation starts again from 0 should its number come back (a replay is a
        no-op: its exchange ids are there with the same hashes)."""
        with self.conn.transaction():
            self.conn.execute(
                'INSERT INTO journal_positions (instance_id, gen, "offset") VALUES (%s, %s, 0)', (self.instance, gen)
            )
            if self._may_delete:  # housekeeping: the superseded positions of the retired generation
                try:
                    with self.conn.transaction():
                        self.conn.execute(
                            'DELETE FROM journal_positions WHERE instance_id = %s AND gen = %s AND "offset" > 0',
                            (self.instance, gen),
                        )
                except psycopg().errors.InsufficientPrivilege:
                    self._may_delete = False  # INSERT and SELECT only: one row per batch stays
        self.offsets.pop(gen, None)

    def prune(self, cutoff: float, batch: int, *, hold_for_export: bool = False) -> int:
        """Delete up to ``batch`` of this chain's oldest rows started before ``cutoff``; ledger
        the anchor (the chain then verifies from it). With ``hold_for_export``, no row the OTLP
        log collector has not acknowledged (ids are never reused here)."""
        if not self._may_prune:
            return 0
        last = self.log_export_position(count=False)[0] if hold_for_export else 2**63 - 1
        rows = self.conn.execute(
            "SELECT id, request_start, coalesce(row_digest, convert_to(row_hash, 'UTF8')), row_digest IS NULL "
            "FROM exchanges WHERE instance_id = %s AND id <= %s ORDER BY id LIMIT %s",
            (self.instance, last, batch),
        ).fetchall()
        old = []
        for row in rows:
            if (row[1] or 0.0) >= cutoff:
                break
            old.append(row)
        if not old:
            return 0
        self.release_rollups()  # a row is rolled up before it goes
        try:
            self._delete(old, cutoff)
        except psycopg().errors.InsufficientPrivilege as exc:
            self._may_prune = False
            log.error("retention is off for this instance: its role may not DELETE (%s)", exc)
            return 0
        return len(old)

    def _delete(self, old: list[tuple], cutoff: float) -> None:
        last_id = old[-1][0]
        with self.conn.transaction():
            self.conn.execute(
                "DELETE FROM content WHERE exchange_id IN "
                "(SELECT exchange_id FROM exchanges WHERE instance_id = %s AND id <= %s)",
                (self.instance, last_id),
            )
            self.conn.execute("DELETE FROM exchanges WHERE instance_id = %s AND id <= %s", (self.instance, last_id))
            self.conn.execute(
                "INSERT INTO pruned (instance_id, cutoff, rows, first_id, last_id, anchor_hash) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (self.instance, cutoff, len(old), old[0][0], last_id, _shown(*old[-1][2:])),
            )

    def prune_rollups(self, cutoff: float) -> int:
        """Delete this instance's rollups of periods that ended before ``cutoff`` (none when the
        role may not DELETE: retention is off for it, as for the rows)."""
        if not self._may_prune:
            return 0
        try:
            with self.conn.transaction():
                deleted = sum(
                    self.conn.execute(
                        f"DELETE FROM {table} WHERE instance_id = %s AND hour <= %s", (self.instance, cutoff - seconds)
                    ).rowcount
                    for table, seconds in rollups.PERIODS.items()
                )
            if deleted:
                self._known_rollups.clear()
            return deleted
        except psycopg().errors.InsufficientPrivilege as exc:
            self._may_prune = False
            log.error("retention is off for this instance: its role may not DELETE (%s)", exc)
            return 0

    # --- the OTLP log export's cursor (llmtap.audit.logexport): this instance's rows after it ---

    def log_export_position(self, *, count: bool = True) -> tuple[int, int]:
        """The id of this instance's last row acknowledged (0: none yet) and how many of its rows follow."""
        row = self.conn.execute(
            "SELECT max(last_id) FROM log_export WHERE instance_id = %s", (self.instance,)
        ).fetchone()
        cursor = row[0] or 0
        if not count:
            return cursor, 0
        pending = self.conn.execute(
            "SELECT count(*) FROM exchanges WHERE instance_id = %s AND id > %s", (self.instance, cursor)
        ).fetchone()[0]
        return cursor, pending

    def rows_after(
        self, row_id: int, limit: int, *, content: bool
    ) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        """Up to ``limit`` of this instance's rows after ``row_id``, oldest first, each with its
        ``content`` row when asked for and there is one. (One writer per instance commits its
        rows in id order, so no row of it can appear later below the cursor.)"""
        join = "LEFT JOIN content c ON c.exchange_id = e.exchange_id" if content else ""
        extra = ", c.input_messages, c.output_messages, c.truncated" if content else ""
        cursor = self.conn.execute(
            f"SELECT e.*{extra} FROM exchanges e {join} WHERE e.instance_id = %s AND e.id > %s ORDER BY e.id LIMIT %s",
            (self.instance, row_id, limit),
        )
        names = [d.name for d in cursor.description]
        split = len(names) - 3 if content else len(names)
        found = []
        for values in cursor.fetchall():
            text = dict(zip(names[split:], values[split:]))
            has_text = text.get("input_messages") is not None or text.get("output_messages") is not None
            row = dict(zip(names[:split], values[:split]))
            for digest, hashed in (("prev_digest", "prev_hash"), ("row_digest", "row_hash")):
                row[hashed] = row.pop(digest) or row[hashed]  # as SQLite's: bytes for a lean row
            found.append((row, text if has_text else None))
        return found

    def advance_log_export(self, last_id: int) -> None:
        """Record that the collector acknowledged this instance's rows up to ``last_id`` (a
        smaller one than the cursor changes nothing: the cursor is the largest)."""
        self.conn.execute(
            "INSERT INTO log_export (instance_id, last_id) VALUES (%s, %s)",
            (self.instance, last_id),
        )

    def _roll_up(self, held: list[tuple[tuple, Any]]) -> dict[tuple[str, bytes], Any]:
        """Write the rollups of the ``held`` rows, and that every row of this instance so far is
        rolled up (inside the caller's transaction); what was written."""
        totals = rollups.aggregate(held, self.rollup_labels, rollups.postgres_decimal)
        written = keep_rollups(
            self.conn, self.instance, totals, known=self._known_rollups, may_delete=self._may_delete_daily
        )
        self.conn.execute(rollups.rolled_up_sql(1, False), (self._last_id(), self.instance))
        return written

    def release_rollups(self) -> None:
        """Write the rollups of the rows held back, if any (before pruning, and on close)."""
        if self._held:
            with self.conn.transaction():
                self.conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.instance,))
                written = self._roll_up(self._held)
            self._held = []
            rollups.remember(self._known_rollups, written)

    def close(self) -> None:
        try:
            self.release_rollups()
        except Exception:
            log.exception("the rollups of %d rows held back stay unwritten until the next start", len(self._held))
        try:
            self.conn.close()
        except Exception:
            pass


def _storable(row: Any, names: list[str], json_names: frozenset[str] | set[str]) -> tuple[list[Any], dict[str, Any]]:
    """A SQLite row's values as PostgreSQL can store them, and the hashed value of each column
    it would not give back as it was hashed (kept in ``json_exact``): text with NUL (stored with
    U+FFFD), JSON text jsonb refuses or reads back otherwise (``\\u0000``; a float such as 1e+16)."""
    values, exact = list(row), {}
    for i, (name, value) in enumerate(zip(names, row)):
        if not isinstance(value, str):
            continue
        if name in json_names:
            if "e+" in value or "-0.0" in value or "\\u0000" in value:
                exact[name] = value
                values[i] = value.replace("\\u0000", "\\ufffd")
        elif "\x00" in value:
            exact[name] = value
            values[i] = value.replace("\x00", "\ufffd")
    return values, exact


def _shown(stored: bytes, legacy: bool) -> str:
    """``coalesce(row_digest, convert_to(row_hash, 'UTF8'))`` as shown (``sha256:<hex>``)."""
    return stored.decode() if legacy else as_hex(stored)


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


#: This module's store, for the registry (``llmtap.audit.stores``).
Store = PostgresStore


# --- reading: chain heads, verify, import ----------------------------------------------------------


def chain_head(conn: Any, instance: str) -> tuple[str, int]:
    """An instance's chain head and its length (rows ever chained, pruned ones included)."""
    pruned = conn.execute(
        "SELECT coalesce(sum(rows), 0), (SELECT anchor_hash FROM pruned WHERE instance_id = %s ORDER BY id DESC LIMIT 1)"
        " FROM pruned WHERE instance_id = %s",
        (instance, instance),
    ).fetchone()
    count = conn.execute("SELECT count(*) FROM exchanges WHERE instance_id = %s", (instance,)).fetchone()[0]
    last = conn.execute(
        "SELECT row_digest, row_hash FROM exchanges WHERE instance_id = %s ORDER BY id DESC LIMIT 1", (instance,)
    ).fetchone()
    return (as_hex(last[0] or last[1]) if last else pruned[1] or GENESIS), int(pruned[0]) + count


def instances(conn: Any) -> list[str]:
    rows = conn.execute(
        "SELECT DISTINCT instance_id FROM exchanges UNION SELECT DISTINCT instance_id FROM pruned ORDER BY 1"
    ).fetchall()
    return [row[0] for row in rows]


class InstanceCheck(NamedTuple):
    instance_id: str
    name: str | None  # the latest --instance name seen on its rows
    check: ChainCheck
    pruned: int  # rows retention deleted before the anchor
    head: str  # the last verified row's hash (the anchor when none)


def _select_list(conn: Any) -> tuple[list[str], list[str]]:
    """The hashed columns as stored here, and the SELECT expressions that read each back as hashed."""
    present = _columns(conn)
    names = sorted(name for name in sqlite_types() if name in present)
    exprs = []
    for name in names:
        kind = sqlite_types()[name]
        if pg_type(name, kind) == "numeric":
            exprs.append(f"{name}::float8" if kind == "REAL" else f"{name}::text")
        else:
            exprs.append(name)
    return names, exprs


def chain_links(conn: Any, instance: str, first_id: int = 0, last_id: int = 2**63 - 1, seen: dict | None = None):
    """One instance's rows from ``first_id`` to ``last_id`` in id order, streamed by a server-side
    cursor (bounded memory); ``seen["name"]`` follows the rows' ``--instance`` name."""
    names, exprs = _select_list(conn)
    json_positions = [i for i, name in enumerate(names) if name in JSON_COLUMNS]
    with conn.transaction(), conn.cursor(name=f"verify_{secrets.token_hex(4)}") as cur:
        cur.itersize = 5000
        cur.execute(
            f"SELECT id, exchange_id, coalesce(prev_digest, convert_to(prev_hash, 'UTF8')), row_digest, row_hash, "
            f"json_exact, {', '.join(exprs)} FROM exchanges WHERE instance_id = %s AND id BETWEEN %s AND %s ORDER BY id",
            (instance, first_id, last_id),
        )
        for values in cur:
            row = dict(zip(names, values[6:]))
            for position in json_positions:
                value = values[6 + position]
                if value is not None:
                    row[names[position]] = canonical_json(value)
            if values[5] is not None:  # JSON texts jsonb would not give back as written
                row.update(json.loads(values[5]))
            if seen is not None:
                seen["name"] = row.get("instance") or seen.get("name")
            if values[3] is not None:
                yield Link(values[0], values[1], values[2], values[3], body_json(row))
            else:
                yield Link(values[0], values[1], values[2].decode(), values[4], body_json(row))


def chain_start(conn: Any, instance: str) -> tuple[int, str]:
    """Rows retention deleted from an instance's chain, and the anchor the rest starts from."""
    pruned, anchor = conn.execute(
        "SELECT coalesce(sum(rows), 0), (SELECT anchor_hash FROM pruned WHERE instance_id = %s "
        "ORDER BY id DESC LIMIT 1) FROM pruned WHERE instance_id = %s",
        (instance, instance),
    ).fetchone()
    return int(pruned), anchor or GENESIS


def verify(conn: Any, only: str | None = None) -> list[InstanceCheck]:
    """Walk every chain (or one instance's) in id order; each stops at its first bad row."""
    results = []
    for instance in instances(conn) if only is None else [only]:
        pruned, anchor = chain_start(conn, instance)
        seen: dict[str, Any] = {}
        check = walk_chain(chain_links(conn, instance, seen=seen), anchor)
        results.append(InstanceCheck(instance, seen.get("name"), check, pruned, check.head))
    return results


def import_sqlite(sqlite_path: str, url: str, instance: str | None = None) -> tuple[str, int]:
    """Copy a SQLite audit log (rows, content, retention ledger) into PostgreSQL as one chain,
    hashes kept, in one transaction; the chain's instance id and the rows copied."""
    from llmtap.audit.sqlite import as_hashed, connect_readonly, content_as_hashed

    source = connect_readonly(sqlite_path)
    conn = connect_migrated(url)
    instance = instance or f"import-{secrets.token_hex(6)}"
    try:
        names = sorted(set(sqlite_types()) & {row[1] for row in source.execute("PRAGMA table_info(exchanges)")})
        columns = ["instance_id", *names, "json_exact", "prev_hash", "row_hash", "prev_digest", "row_digest"]
        json_names = JSON_COLUMNS & set(names)
        copied = 0
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (instance,))
            if conn.execute("SELECT 1 FROM exchanges WHERE instance_id = %s LIMIT 1", (instance,)).fetchone():
                raise ValueError(f"instance {instance} already has rows in the database")
            for row in source.execute("SELECT * FROM pruned ORDER BY id"):
                conn.execute(
                    "INSERT INTO pruned (instance_id, pruned_at, cutoff, rows, first_id, last_id, anchor_hash) "
                    "VALUES (%s, to_timestamp(%s), %s, %s, %s, %s, %s)",
                    (
                        instance,
                        row["pruned_at"],
                        row["cutoff"],
                        row["rows"],
                        row["first_id"],
                        row["last_id"],
                        as_hex(row["anchor_hash"]),
                    ),
                )
            with conn.cursor() as cur, cur.copy(f"COPY exchanges ({', '.join(columns)}) FROM STDIN") as copy:
                for stored in as_hashed(source, map(dict, source.execute("SELECT * FROM exchanges ORDER BY id"))):
                    row = [stored[name] for name in (*names, "prev_hash", "row_hash")]
                    values, exact = _storable(row[: len(names)], names, json_names)
                    json_exact = json.dumps(exact, ensure_ascii=False) if exact else None
                    links = (
                        [None, None, *row[len(names) :]]
                        if isinstance(row[-1], bytes)
                        else [*row[len(names) :], None, None]
                    )
                    copy.write_row([instance, *values, json_exact, *links])
                    copied += 1
            contents = source.execute("SELECT exchange_id, input_messages, output_messages, truncated FROM content")
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO content VALUES (%s, %s, %s, %s)",
                    [tuple(content_as_hashed(dict(r)).values()) for r in contents],
                )
            backfill(conn, instance)
            set_watermark(conn, instance)
    finally:
        source.close()
        conn.close()
    return instance, copied
