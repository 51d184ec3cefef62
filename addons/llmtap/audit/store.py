"""The audit database: schema, migrations, rows and the hash chain.

Shared by the audit writer process (``AuditStore`` applies journal batches and prunes)
and by the read-only ``llmtap report`` / ``llmtap audit verify`` (``connect_readonly``,
``verify_chain``). Nothing here runs on mitmproxy's event loop.

Hash chain (the contract ``llmtap audit verify`` checks)::

    row_hash = "sha256:" + hex(sha256(utf8(prev_hash + canonical_json(body))))

where ``body`` maps every column of the ``exchanges`` row except ``id``, ``prev_hash`` and
``row_hash`` whose value is not NULL to the value as stored (JSON columns as their text),
``canonical_json`` is sorted keys, ``","``/``":"`` separators, non-ASCII kept as UTF-8, floats
in Python ``repr`` form. The first row's ``prev_hash`` is ``GENESIS``; after retention pruned
the oldest rows, the chain restarts from the ``anchor_hash`` of the latest ``pruned`` row (the
hash of the last row deleted). Migrations only ever add nullable columns, so old rows keep
their hashes.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import itertools
import json
import math
import operator
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import takewhile
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from sqlite_utils import Database

from llmtap.record import canonical_json

GENESIS = "sha256:" + "0" * 64
PAGE_SIZE = 16384
#: Columns holding JSON text (the record's mappings and lists).
JSON_COLUMNS = frozenset(
    {
        "labels",
        "weights",
        "policies",
        "stop",
        "tool_names",
        "tool_types",
        "finish_reasons",
        "response_labels",
        "metadata_json",
        "anomalies",
    }
)
_UNHASHED = frozenset({"id", "prev_hash", "row_hash"})
#: Per-row faults: the row is dropped and counted; anything else (locked, I/O) retries the batch.
_ROW_SQL_FAULTS = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError)


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


def _create_log_export(db: Database) -> None:
    """The OTLP log export's cursor, per instance: the last row id the collector acknowledged."""
    db["log_export"].create({"instance": str, "last_id": int, "acked_at": float}, pk="instance", not_null={"last_id"})


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
    _create_log_export,
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


# --- rows and the hash chain -------------------------------------------------------------------


def row_builder(types: Mapping[str, str]) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """A function from a journaled record (``ExchangeRecord.to_dict()`` as parsed from its JSON
    line) to its ``exchanges`` row, each value coerced to its column's declared type.

    Coercion makes every value read back exactly as it was hashed (SQLite would turn an int in
    a REAL column into a float, a bool into 0/1, NaN into NULL). A value that does not fit its
    type becomes NULL; the raw Pulze metadata is kept whole in ``metadata_json`` either way.
    The writer maps the parsed dict directly, without rebuilding the record, and most records
    through ``RowBuilder``'s shortcut, which must give the same rows.
    """
    plan = [
        (name, _SOURCES.get(name, name), _to_json if name in JSON_COLUMNS else _CONVERTERS.get(kind, _to_text))
        for name, kind in types.items()
        if name not in _ELAPSED
    ]
    elapsed = [(name, end) for name, end in _ELAPSED.items() if name in types]

    def build(data: Mapping[str, Any]) -> dict[str, Any]:
        row = {}
        for name, key, convert in plan:
            value = data.get(key)
            row[name] = None if value is None else convert(value)
        start = _to_real(data.get("request_start"))
        for name, key in elapsed:
            end = _to_real(data.get(key))
            row[name] = None if start is None or end is None else max(0.0, end - start)
        return row

    return build


def _to_integer(value: Any) -> int | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return int(value) if isinstance(value, int) and -(2**63) <= value < 2**63 else None


def _to_real(value: Any) -> float | None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value) or 0.0  # -0.0 would read back as 0.0


def _to_text(value: Any) -> str:
    return _text(value if isinstance(value, str) else canonical_json(value))


def _to_json(value: Any) -> str:
    return _text(canonical_json(value))


_CONVERTERS = {"INTEGER": _to_integer, "REAL": _to_real}
#: Columns named differently from the record field they hold.
_SOURCES = {"metadata_json": "metadata"}
#: Derived columns: seconds from request_start to this field (ExchangeRecord.duration_s and
#: .time_to_first_token_s, computed from the journaled dict).
_ELAPSED = {"duration_s": "response_end", "ttft_s": "first_token_at"}


def _text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def chain_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    """``row_hash`` of a row (see the module docstring for the canonical form)."""
    return _row_hash(prev_hash, _body_json(row))


def _body_json(row: Mapping[str, Any]) -> str:
    return canonical_json({name: value for name, value in row.items() if value is not None and name not in _UNHASHED})


def _row_hash(prev_hash: str, body_json: str) -> str:
    return "sha256:" + hashlib.sha256((prev_hash + body_json).encode("utf-8")).hexdigest()


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_ID = _INT64_MAX


class _Plan(NamedTuple):
    """What ``RowBuilder`` does with the values of one combination of value types."""

    convert: tuple[tuple[int, Callable[[Any], Any]], ...]  # bools and ints to int/float, JSON to text
    elapsed: tuple[int, ...]  # duration_s and ttft_s, holding their end time until computed
    reals: Callable[[Sequence[Any]], tuple[float, ...]]  # checked finite, and -0.0 made 0.0
    real_positions: tuple[int, ...]
    ints: Callable[[Sequence[Any]], tuple[int, ...]]  # checked to fit in 64 bits
    texts: Callable[[Sequence[Any]], tuple[str, ...]]  # JSON columns' text: escaped for the body
    strs: Callable[[Sequence[Any]], tuple[str, ...]]  # TEXT columns' strings: copied into the body
    names: tuple[str, ...]  # the non-NULL columns, sorted: the body's keys
    values: Callable[[Sequence[Any]], tuple[Any, ...]]  # their values
    body: Callable[[Sequence[Any]], tuple[Any, ...]]  # the same, JSON texts escaped (appended)
    template: str  # the body's canonical JSON with a %-placeholder per value
    insert: str  # the INSERT of these columns


class RowBuilder:
    """Journaled records to ``exchanges`` rows: the INSERT, its parameters, the hashed body.

    ``row_builder`` defines the coercion; this is its shortcut for llmtap's own records, whose
    values almost always have their column's type already. What one combination of value types
    needs (a few conversions and range checks, the body as a %-template, an INSERT of the
    non-NULL columns) is worked out once and cached, which leaves a handful of C calls per row.
    Anything else (an odd value, a line with a ``\\u`` escape, which may be a lone surrogate, a
    record of an older llmtap that lacks a field) goes through ``row_builder``.
    """

    def __init__(self, types: Mapping[str, str]) -> None:
        self.columns = sorted(name for name in types if name not in _UNHASHED)
        self._general = row_builder(types)
        self._kinds = [
            "ELAPSED" if name in _ELAPSED else "JSON" if name in JSON_COLUMNS else types[name] for name in self.columns
        ]
        # an elapsed column holds its end time until the row's request_start is known
        self._get = operator.itemgetter(*[_ELAPSED.get(name) or _SOURCES.get(name, name) for name in self.columns])
        self._start = self.columns.index("request_start") if "request_start" in self.columns else None
        self._plan = functools.lru_cache(maxsize=256)(self._compile)

    def __call__(self, data: Mapping[str, Any], *, clean: bool) -> tuple[str, list[Any], str]:
        """The row's INSERT, its parameters (the last two, prev_hash and row_hash, left None)
        and the canonical JSON of its body. ``clean``: no string in ``data`` holds a lone
        surrogate."""
        row = self._fast(data) if clean else None
        if row is None:
            general = self._general(data)
            names = tuple(name for name in self.columns if general[name] is not None)
            row = _insert_sql(names), [*map(general.__getitem__, names), None, None], _body_json(general)
        return row

    def _fast(self, data: Mapping[str, Any]) -> tuple[str, list[Any], str] | None:
        try:
            values = list(self._get(data))
        except KeyError:
            return None
        plan = self._plan(tuple(map(type, values)))
        if plan is None:
            return None
        for position, convert in plan.convert:
            values[position] = convert(values[position])
        if plan.elapsed:
            start = values[self._start]
            for position in plan.elapsed:
                values[position] = max(0.0, values[position] - start)
        reals = plan.reals(values)
        total = sum(reals)
        if total - total:  # NaN or an infinity (or a sum that overflowed)
            return None
        if 0.0 in reals:
            for position in plan.real_positions:
                if values[position] == 0.0:
                    values[position] = 0.0  # -0.0 would read back as 0.0
        ints = plan.ints(values)
        if ints and (min(ints) < _INT64_MIN or max(ints) > _INT64_MAX):
            return None
        present = plan.values(values)
        strs = "".join(plan.strs(values))
        if '"' in strs or "\\" in strs or not strs.isprintable():  # a string the body must escape
            body = canonical_json(dict(zip(plan.names, present)))
        else:
            body = plan.template % plan.body([*values, *map(encode_basestring, plan.texts(values))])
        return plan.insert, [*present, None, None], body

    def _compile(self, signature: tuple[type, ...]) -> _Plan | None:
        """The plan for values of these types, or None when one needs ``row_builder``."""
        if self._start is None or signature[self._start] not in (float, int):
            return None
        convert, elapsed, reals, ints, texts, strs = [], [], [], [], [], []
        names, present, body, layout = [], [], [], []  # the body: its keys, values, placeholders
        for position, (name, kind, seen) in enumerate(zip(self.columns, self._kinds, signature)):
            if seen is type(None):
                continue
            names.append(name)
            present.append(position)
            body.append(position)
            if kind == "JSON":
                if seen not in (dict, list):
                    return None
                convert.append((position, canonical_json))
                body[-1] = len(signature) + len(texts)  # the escaped text, appended to the values
                texts.append(position)
                layout.append("%s")
            elif kind == "INTEGER":
                if seen is bool:
                    convert.append((position, int))
                elif seen is int:
                    ints.append(position)
                else:
                    return None
                layout.append("%d")
            elif kind in ("REAL", "ELAPSED"):
                if seen is int:
                    convert.append((position, float))
                elif seen is not float:
                    return None
                if kind == "ELAPSED":
                    elapsed.append(position)
                if seen is float or kind == "ELAPSED":
                    reals.append(position)
                layout.append("%r")
            elif seen is str:
                strs.append(position)
                layout.append('"%s"')
            else:
                return None
        keys = [encode_basestring(name).replace("%", "%%") for name in names]
        return _Plan(
            tuple(convert),
            tuple(elapsed),
            _picker(reals),
            tuple(reals),
            _picker(ints),
            _picker(texts),
            _picker(strs),
            tuple(names),
            _picker(present),
            _picker(body),
            "{" + ",".join(f"{key}:{spec}" for key, spec in zip(keys, layout)) + "}",
            _insert_sql(tuple(names)),
        )


def _picker(positions: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """``itemgetter(*positions)`` that always returns a tuple."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    return lambda values: tuple(values[position] for position in positions)


@functools.lru_cache(maxsize=256)
def _insert_sql(names: tuple[str, ...]) -> str:
    """The INSERT of a row whose other columns are NULL (sqlite3 binds a None ten times slower
    than a number)."""
    columns = [*names, "prev_hash", "row_hash"]
    return f"INSERT OR IGNORE INTO exchanges ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def chain_anchor(conn: sqlite3.Connection) -> str:
    """Where the chain starts: GENESIS, or the hash of the last row retention deleted."""
    row = conn.execute("SELECT anchor_hash FROM pruned ORDER BY id DESC LIMIT 1").fetchone()
    return row[0] if row else GENESIS


class ChainCheck(NamedTuple):
    rows: int  # rows checked before the first break (all of them when ok)
    anchor: str  # GENESIS, or the anchor_hash of the latest pruning
    broken_id: int | None = None
    broken_exchange_id: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.broken_id is None


def verify_chain(conn: sqlite3.Connection) -> ChainCheck:
    """Walk the chain in id order; stop at the first row that does not hash as recorded."""
    anchor = chain_anchor(conn)
    prev, checked = anchor, 0
    cursor = conn.execute("SELECT * FROM exchanges ORDER BY id")
    names = [d[0] for d in cursor.description]
    for values in cursor:
        row = dict(zip(names, values))
        reason = None
        if row["prev_hash"] != prev:
            reason = "prev_hash does not match the row before it (a row was removed, inserted or reordered)"
        elif row["row_hash"] != chain_hash(prev, row):
            reason = "row_hash does not match the row's contents (the row was edited)"
        if reason:
            return ChainCheck(checked, anchor, row["id"], row["exchange_id"], reason)
        prev, checked = row["row_hash"], checked + 1
    return ChainCheck(checked, anchor)


# --- the SQLite side (the writer process only) ----------------------------------------------------

_INSERT_CONTENT = "INSERT OR REPLACE INTO content VALUES (?, ?, ?, ?)"


def _parse_line(line: bytes, text: str | None) -> Any:
    """orjson when it can (most lines; 2-3x faster); json.loads for what orjson refuses and
    the journal may hold: NaN, integers beyond 64 bits, escaped lone surrogates."""
    try:
        return orjson.loads(line)
    except ValueError:
        return json.loads(line if text is None else text)


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

    def __init__(self, path: str, *, fsync_batch: bool, capture_content: bool) -> None:
        self.db = connect(path, fsync_batch=fsync_batch)
        self.conn = self.db.conn
        self.capture_content = capture_content
        try:
            self.types = {c.name: c.type.upper() for c in self.db["exchanges"].columns if c.name != "id"}
            self.offsets: dict[int, int] = dict(self.conn.execute("SELECT gen, offset FROM journal_offsets"))
            head = self.conn.execute("SELECT row_hash FROM exchanges ORDER BY id DESC LIMIT 1").fetchone()
            self.head = head[0] if head else chain_anchor(self.conn)
        except BaseException:
            self.conn.close()
            raise
        self._row = RowBuilder(self.types)

    def apply(self, gen: int, lines: list[bytes], end: int) -> Batch:
        """Insert the records of ``lines`` and record ``end`` as gen's offset, atomically.

        The garbage collector is paused meanwhile: the rows a batch holds until its end set off
        a few collections per batch, about 2% of the time.
        """
        collecting = gc.isenabled()
        gc.disable()
        try:
            rows, corrupt, rejected = self._build(lines)
            with self.db.atomic():
                head = self._insert_batch(rows)
                if head is None:
                    head = self._insert_each(rows, rejected)
                self.conn.execute("INSERT OR REPLACE INTO journal_offsets (gen, offset) VALUES (?, ?)", (gen, end))
        finally:
            if collecting:
                gc.enable()
        self.head, self.offsets[gen] = head, end
        return Batch(corrupt, rejected, [row.data for row in rows])

    def _build(self, lines: list[bytes]) -> tuple[list[_Row], list[Exception], list[Exception]]:
        """The rows of ``lines``, the lines that are not a record, the records that are no row."""
        rows, corrupt, rejected = [], [], []
        for line in lines:
            text = None  # the line as UTF-8 text (json.loads reads such bytes so too), when it is
            if line[:2] == b'{"':
                try:
                    text = line.decode()
                except UnicodeDecodeError:
                    pass
            try:
                data = _parse_line(line, text)
                if not isinstance(data, dict) or not isinstance(data.get("exchange_id"), str):
                    raise ValueError("not a journaled record")
            except ValueError as exc:
                corrupt.append(exc)
                continue
            # no raw surrogate in valid UTF-8, and none escaped without a \u (a backslash is rare,
            # and far quicker to look for)
            clean = text is not None and ("\\" not in text or "\\u" not in text)
            try:
                rows.append(_Row(*self._row(data, clean=clean), self._content(data), data))
            except Exception as exc:  # a record that cannot become a row must not block the rest
                rejected.append(exc)
        return rows, corrupt, rejected

    def _insert_batch(self, rows: list[_Row]) -> str | None:
        """Chain ``rows`` as if all were new and insert them with an ``executemany`` per run of
        one INSERT; the new head, or None, with nothing written, when one was already there (a
        replay) or faulted."""
        head = self.head
        for row in rows:
            row.params[-2:] = head, _row_hash(head, row.body)
            head = row.params[-1]
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
        return head

    def _insert_each(self, rows: list[_Row], rejected: list[Exception]) -> str:
        """Insert ``rows`` one by one, chaining only those inserted; the new head."""
        head = self.head
        for row in rows:
            row.params[-2:] = head, _row_hash(head, row.body)
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
            if row.content is not None:
                self.conn.execute(_INSERT_CONTENT, row.content)
        return head

    def _content(self, data: Mapping[str, Any]) -> tuple[str, str | None, str | None, int] | None:
        """The ``content`` row, only when capture is on and the record carries text.

        The parser already capped it (``llmtap_content_max_chars`` per direction) and marked
        each cut message ``truncated``.
        """
        inputs, outputs = data.get("input_messages"), data.get("output_messages")
        if not self.capture_content or not (inputs or outputs):
            return None
        truncated = any(isinstance(m, Mapping) and m.get("truncated") for m in [*(inputs or ()), *(outputs or ())])
        texts = [None if messages is None else _text(canonical_json(messages)) for messages in (inputs, outputs)]
        return data["exchange_id"], texts[0], texts[1], int(truncated)

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
        last = _MAX_ID
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
                (time.time(), cutoff, len(old), old[0][0], last_id, old[-1][2]),
            )
        return len(old)

    # --- the OTLP log export's cursor (llmtap.audit.logexport): rows after it await acknowledgement ---

    #: The cursor's key: a SQLite file holds one instance's rows.
    instance = "local"

    def log_export_position(self) -> tuple[int, int]:
        """The id of the last row acknowledged (0: none yet) and how many rows follow it."""
        row = self.conn.execute("SELECT last_id FROM log_export WHERE instance = ?", (self.instance,)).fetchone()
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
        return found

    def advance_log_export(self, last_id: int) -> None:
        """Record that the collector acknowledged every row up to ``last_id`` (never backwards)."""
        with self.db.atomic():
            self.conn.execute(
                "INSERT INTO log_export (instance, last_id, acked_at) VALUES (?, ?, ?) ON CONFLICT (instance) "
                "DO UPDATE SET last_id = max(last_id, excluded.last_id), acked_at = excluded.acked_at",
                (self.instance, last_id, time.time()),
            )

    def close(self) -> None:
        self.conn.close()
