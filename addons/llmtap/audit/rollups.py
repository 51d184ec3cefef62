"""Hourly rollups: the sums ``llmtap report`` reads, kept by the writer beside the rows.

One rollup row per UTC hour x model x provider x app x key fingerprint x status x operation x
family x record schema x instance x cost source x allow-listed labels (and, in PostgreSQL,
x instance_id: each sidecar upserts only its own rollup rows). The stores add a batch's
rollups in the transaction of the rows it inserted, so rollups equal their rows exactly; a
replayed or refused record adds nothing. This module is pure: the key and values of rows
(from the values the stores insert, or read back for a backfill or a report), merging, the
histograms, and the table's SQL for both engines.

Values: counts (requests, errors, ``unknown_cost`` as the report counts it, ``unpriced``:
cost unknown and no error), token sums and ``cost_nanousd`` (integer, NULL until a row had
one, like SQL's ``sum``), two exact decimal sums (``cost_decimal_usd``: the float ``cost_usd``
of rows without ``cost_nanousd``, i.e. rows of an older llmtap; ``cost_savings_usd``), and
two histograms (request duration, time to first token) of ``BUCKETS`` log-spaced buckets.

Buckets: bucket 0 holds [0, 1 ms); bucket i holds [1 ms * 2^((i-1)/4), 1 ms * 2^(i/4)), four
per doubling (each 19% wider than the one before), up to 2^21 ms (35 minutes); the last holds
everything longer. A percentile is read nearest-rank and reported as the upper bound of the
bucket holding that rank (the last bucket: its lower bound): never below the exact value, at
most 19% above it.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import math
import operator
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import orjson

from llmtap.record import canonical_json

KEY_COLUMNS = (
    "hour",
    "model",
    "provider",
    "app_id",
    "key_fingerprint",
    "status",
    "operation",
    "family",
    "record_schema",
    "instance",
    "cost_source",
    "labels",  # the allow-listed labels present, as canonical JSON (NULL: none)
    "label_names",  # the allow-list in force, as a canonical JSON list
)
COUNTS = ("requests", "errors", "unknown_cost", "unpriced")
SUMS = ("input_tokens", "output_tokens", "total_tokens", "cached_input_tokens", "reasoning_tokens", "cost_nanousd")
DECIMALS = ("cost_decimal_usd", "cost_savings_usd")
#: Sparse histograms, stored as JSON objects of bucket -> count (``{"41":2,"45":1,"9":1}``): a rollup
#: row holds a few requests, so a few buckets; 20 bytes where fixed columns took 170.
HISTOGRAMS = ("duration", "ttft")
BUCKETS = 86
_PER_DOUBLING = 4
_FIRST = 0.001  # seconds: the upper bound of bucket 0
VALUE_COLUMNS = COUNTS + SUMS + DECIMALS + HISTOGRAMS
_SUM_AT = len(COUNTS)
_DECIMAL_AT = _SUM_AT + len(SUMS)
_HISTOGRAM_AT = _DECIMAL_AT + len(DECIMALS)

#: The row columns a rollup reads: a row is counted from these values, as stored (the stores
#: pass the values of the rows they insert, so a rollup counts exactly what its row holds).
SOURCE_COLUMNS = (
    "request_start",
    "response_model",
    "request_model",
    "provider",
    "app_id",
    "key_fingerprint",
    "http_status",
    "error_type",
    "operation",
    "family",
    "record_schema",
    "instance",
    "cost_source",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "cost_nanousd",
    "cost_usd",
    "cost_savings_usd",
    "duration_s",
    "ttft_s",
)
#: Positions in the source values: the token sums then cost_nanousd, the money, the timings.
_TOKENS = tuple(range(SOURCE_COLUMNS.index("input_tokens"), SOURCE_COLUMNS.index("cost_nanousd") + 1))
_COST, _SAVINGS = SOURCE_COLUMNS.index("cost_usd"), SOURCE_COLUMNS.index("cost_savings_usd")
_DURATION, _TTFT = SOURCE_COLUMNS.index("duration_s"), SOURCE_COLUMNS.index("ttft_s")

Key = tuple
Values = list  # aligned with VALUE_COLUMNS

#: The rollup tables, by the seconds each row covers. A report reads whole UTC days from the
#: daily table (a year is 365 periods of a key, not 8,760) and the hours around them, and any
#: grouping by hour, from the hourly one. Both have the same columns; ``hour`` is the first hour
#: of the row's period. The writer adds each batch to the hourly table and folds each closed day
#: into the daily one once (``keep``); the daily table is complete before the watermark.
PERIODS = {"rollups": 3600, "rollups_daily": 86400}


def sqlite_decimal(value: float | Decimal) -> Decimal:
    """A REAL amount as the SQLite report sums it: 15 significant digits (every float holds
    them exactly, so 17 x 0.2 / 1e6 counts as 0.0000034)."""
    return value if isinstance(value, Decimal) else Decimal(format(value, ".15g"))


def postgres_decimal(value: float | Decimal) -> Decimal:
    """A float amount as PostgreSQL's ``numeric`` column stores it (its shortest repr); a
    ``numeric`` read back as it is."""
    return value if isinstance(value, Decimal) else Decimal(repr(value))


#: The upper bounds of the buckets but the last (the last is open).
_UPPER = tuple(_FIRST * 2 ** (i / _PER_DOUBLING) for i in range(BUCKETS - 1))
bucket = functools.partial(bisect.bisect_right, _UPPER)  # seconds -> its bucket (C speed)


def bucket_bounds(index: int) -> tuple[float, float]:
    """[lower, upper) of a bucket, in seconds."""
    lower = 0.0 if index == 0 else _UPPER[index - 1]
    upper = math.inf if index == BUCKETS - 1 else _UPPER[index]
    return lower, upper


def percentile(counts: Mapping[int, int], p: float) -> float | None:
    """Nearest-rank percentile of a histogram (bucket -> count): the upper bound of the bucket
    holding the rank (the last, open bucket: its lower bound); None for an empty histogram."""
    total = sum(counts.values())
    if not total:
        return None
    rank, seen = max(1, math.ceil(p * total)), 0
    for index in sorted(counts):
        seen += counts[index]
        if seen >= rank:
            lower, upper = bucket_bounds(index)
            return upper if math.isfinite(upper) else lower
    raise AssertionError("unreachable: the ranks add up to the total")


def label_names(allowed: Iterable[str]) -> str:
    """The allow-list as stored (``key`` in the metric labels is the key fingerprint, always kept)."""
    return canonical_json(sorted({name for name in allowed if name != "key"}))


@functools.lru_cache(maxsize=256)
def picker(columns: tuple[str, ...]) -> Callable[[Sequence[Any]], tuple]:
    """From a row's values in ``columns`` order (more may follow) to its source values (None
    for a column not among them)."""
    getter = operator.itemgetter(*[columns.index(c) if c in columns else -1 for c in SOURCE_COLUMNS])
    if all(c in columns for c in SOURCE_COLUMNS):
        return getter
    return lambda values: getter([*values, None])  # a column not among them: the None appended


def empty() -> Values:
    return [0] * len(COUNTS) + [None] * (len(SUMS) + len(DECIMALS)) + [_counter() for _ in HISTOGRAMS]


#: An empty Counter without ``Counter.__init__`` (a Python call each; a batch makes thousands).
_counter = functools.partial(Counter.__new__, Counter)


def _counts(buckets: Iterable[int]) -> Counter:
    """A histogram of ``buckets`` (each counted once)."""
    counts = _counter()
    for index in buckets:
        counts[index] = counts.get(index, 0) + 1
    return counts


_known = functools.partial(operator.is_not, None)


def _sum(column: tuple) -> int | None:
    """SQL's ``sum``: None when every value is."""
    return None if column.count(None) == len(column) else sum(filter(None, column))


def values_of(sources: Sequence[Sequence[Any]], decimal: Callable[[Any], Decimal]) -> Values:
    """The rollup values of rows (each its source values), column by column at C speed.
    ``decimal``: how the store sums a float amount exactly (``sqlite_decimal``, ``postgres_decimal``)."""
    if len(sources) == 1:  # most groups of a batch: one row (the same values, without the columns)
        return _values_of_one(sources[0], decimal)
    return _values_of_many(sources, decimal)


def _one(value: Any) -> Any:
    """``_sum`` of one value."""
    return None if value is None else (value + 0 if value else 0)


def _values_of_one(source: Sequence[Any], decimal: Callable[[Any], Decimal]) -> Values:
    error, cost, nano, saved = source[7], source[_COST], source[_TOKENS[-1]], source[_SAVINGS]
    unknown = cost is None
    values = [
        1,
        0 if error is None else 1,
        1 if unknown and source[12] != "deferred" else 0,
        1 if unknown and error is None else 0,
    ]
    values += [_one(source[position]) for position in _TOKENS[:-1]]
    values.append(None if unknown else _one(nano))
    values.append(decimal(cost) if not unknown and nano is None else None)
    values.append(None if saved is None else decimal(saved))
    duration, ttft = source[_DURATION], source[_TTFT]
    values.append(_counter())
    values.append(_counter())
    if duration is not None:
        values[-2][bucket(duration)] = 1
    if ttft is not None:
        values[-1][bucket(ttft)] = 1
    return values


def _values_of_many(sources: Sequence[Sequence[Any]], decimal: Callable[[Any], Decimal]) -> Values:
    columns = list(zip(*sources))
    error, cost_source, cost, nano = columns[7], columns[12], columns[_COST], columns[_TOKENS[-1]]
    unknown = deferred = unpriced = 0
    if None in cost:
        unknown = cost.count(None)
        deferred = list(zip(cost, cost_source)).count((None, "deferred"))  # as the report counts unknown_cost
        unpriced = list(zip(cost, error)).count((None, None))  # what the report lists as unpriced
        nano = tuple(n for c, n in zip(cost, nano) if c is not None)  # a cost counts only with cost_usd
    values = [len(sources), len(error) - error.count(None), unknown - deferred, unpriced]
    values += [_sum(columns[position]) for position in _TOKENS[:-1]]
    values.append(_sum(nano) if nano else None)
    older = [c for c, n in zip(cost, columns[_TOKENS[-1]]) if c is not None and n is None]  # an older llmtap's
    saved = [v for v in columns[_SAVINGS] if v is not None]
    values.append(sum(map(decimal, older)) if older else None)
    values.append(sum(map(decimal, saved)) if saved else None)
    values += [_counts(map(bucket, filter(_known, columns[position]))) for position in (_DURATION, _TTFT)]
    return values


def merge(into: Values, other: Values) -> None:
    """Add ``other`` into ``into`` (NULL-preserving for the sums, as SQL's ``sum``; the
    histograms of ``into`` are added to in place, no new Counter each)."""
    into[:_HISTOGRAM_AT] = [
        mine if theirs is None else theirs if mine is None else mine + theirs
        for mine, theirs in zip(into[:_HISTOGRAM_AT], other[:_HISTOGRAM_AT])
    ]
    for i in range(_HISTOGRAM_AT, len(other)):
        if other[i]:
            into[i].update(other[i])


def aggregate(
    rows: Iterable[tuple[Sequence[Any], Any]], allowed: Iterable[str], decimal: Callable[[Any], Decimal]
) -> dict[Key, Values]:
    """The rollups of ``rows`` (each its source values and its labels' parsed JSON value), by key.

    Rows are grouped by their raw values first (a tuple slice per row), each group's values
    summed column by column, and only then each group's key made (a model from the response
    or else the request, the status as the report's, ...): keys that come out equal merge.
    """
    names_text = label_names(allowed)
    names = json.loads(names_text)
    groups: dict[tuple, list] = defaultdict(list)
    for source, labels in rows:
        start = source[0]
        raw = (-math.inf if start is None else start // 3600, source[1:13], _labels(labels, names) if names else None)
        groups[raw].append(source)
    totals: dict[Key, Values] = {}
    for (hour, kept, labels), sources in groups.items():
        tail = _TAILS.get((kept, labels, names_text))
        if tail is None:
            tail = _tail(kept, labels, names_text)
        key = (hour * 3600, *tail)  # -inf for a row without a start time: before every hour
        values = values_of(sources, decimal)
        if key in totals:
            merge(totals[key], values)
        else:
            totals[key] = values
    return totals


#: The keys' columns after the hour, by a group's raw values (a batch meets the same few hundred
#: again and again): bounded, emptied when full.
_TAILS: dict[tuple, tuple] = {}
_TAILS_MAX = 50_000


def _tail(kept: tuple, labels: tuple | str | None, names_text: str) -> tuple:
    """A key's columns after the hour, from a group's raw values (remembered in ``_TAILS``)."""
    model, requested, provider, app, key, status, error, operation, family, schema, instance, cost_source = kept
    text = canonical_json({name: value for name, _, value in labels}) if isinstance(labels, tuple) else labels
    tail = (
        model if model is not None else requested,
        provider,
        app,
        key,
        str(status) if status is not None else error,  # as the report's status
        operation,
        family,
        1 if schema is None else schema,  # rows before schemas were numbered
        instance,
        cost_source,
        None if text is None else text.encode("utf-8", "replace").decode("utf-8"),  # as the row's labels text
        names_text,
    )
    if len(_TAILS) >= _TAILS_MAX:
        _TAILS.clear()
    _TAILS[kept, labels, names_text] = tail
    return tail


def in_periods(totals: dict[Key, Values], seconds: int) -> dict[Key, Values]:
    """Hourly ``totals`` added up by the period of ``seconds`` that holds each hour."""
    if seconds == 3600:
        return totals
    periods: dict[Key, Values] = {}
    for key, values in totals.items():
        merge(periods.setdefault((period_of(key[0], seconds), *key[1:]), empty()), values)
    return periods


def period_of(hour: float, seconds: int) -> float:
    """The first hour of the period of ``seconds`` that holds ``hour``; -inf (rows without a
    start time) stays -inf (``-inf // n`` is NaN, which SQLite stores as NULL)."""
    return hour if hour == -math.inf else hour // seconds * seconds


def _labels(labels: Any, names: list[str]) -> tuple | str | None:
    """The allow-listed labels of a row, hashable: (name, type, value) triples (the type keeps
    1 and true apart), or their canonical JSON when a value is no scalar."""
    if not isinstance(labels, dict):
        return None
    kept = tuple((name, type(labels[name]), labels[name]) for name in names if name in labels)
    if not kept:
        return None
    try:
        hash(kept)
    except TypeError:
        return canonical_json({name: value for name, _, value in kept})
    return kept


def histogram(values: Values, name: str) -> Counter:
    """A histogram of ``values`` (bucket -> count; add to it in place)."""
    return values[_HISTOGRAM_AT + HISTOGRAMS.index(name)]


def decimal_of(values: Values, name: str) -> Decimal | None:
    return values[_DECIMAL_AT + DECIMALS.index(name)]


@functools.lru_cache(maxsize=32768)
def storable_key(key: Key) -> bytes:
    """The key as the table's primary key: 16 bytes of BLAKE2b of its JSON (NULLs compare
    equal in it; the key's columns are stored beside it for SQL). Memoized: a writer meets the
    same keys batch after batch within an hour (a cache of a few MB at most)."""
    return hashlib.blake2b(json.dumps(key, ensure_ascii=False, separators=(",", ":")).encode(), digest_size=16).digest()


def table_sql(table: str, owner: tuple[str, ...], primary: tuple[str, ...], types: Mapping[str, str]) -> str:
    """A rollup table's DDL; ``types``: the engine's type of each kind (text, real, integer,
    bytes, count, sum, decimal, json); ``owner``: columns before the key's (PostgreSQL's
    instance_id); ``primary``: the primary key."""
    kinds = {
        "hour": "real",
        "record_schema": "integer",
        "labels": "json",
        **dict.fromkeys(COUNTS, "count"),
        **dict.fromkeys(SUMS, "sum"),
        **dict.fromkeys(DECIMALS, "decimal"),
        **dict.fromkeys(HISTOGRAMS, "json"),
    }
    columns = [f"{name} {types['text']} NOT NULL" for name in owner]
    columns.append(f"key {types['bytes']} NOT NULL")
    columns += [f"{name} {types[kinds.get(name, 'text')]}" for name in KEY_COLUMNS + VALUE_COLUMNS]
    columns.append(f"PRIMARY KEY ({', '.join(primary)})")
    return f"CREATE TABLE {table} ({', '.join(columns)})"


def write(
    totals: dict[Key, Values],
    owner: tuple[Any, ...],
    fetch: Callable[[str, list[Any]], Iterable[Sequence[Any]]],
    executemany: Callable[[str, list[list[Any]]], Any],
    *,
    sqlite: bool,
    table: str = "rollups",
    known: Mapping[tuple[str, bytes], Values] | None = None,
) -> dict[tuple[str, bytes], Values]:
    """Add ``totals`` into a rollup table, inside the caller's transaction: read the touched
    rows, add in Python (exact decimals, sparse histograms), write them back in key order.
    ``owner``: PostgreSQL's instance id (its writer alone touches its rows, under its lock).
    ``fetch`` and ``executemany`` run SQL. ``known``: the values of rows as this writer last
    committed them (by table and key hash), which need no read. Returns the values written,
    for ``known`` once the transaction has committed."""
    placeholder = "?" if sqlite else "%s"
    hashed = sorted((storable_key(key), key) for key in totals)
    unread, stored_rows = [], set()
    for digest, key in hashed:
        stored = None if known is None else known.get((table, digest))
        if stored is None:
            unread.append((digest, key))
        else:
            merge(totals[key], stored)
            stored_rows.add(digest)
    by_hash = dict(unread)
    hours = sorted({key[0] for _, key in unread})
    for start in range(0, len(unread), 500):
        chunk = [digest for digest, _ in unread[start : start + 500]]
        sql = stored_sql(table, len(owner), len(hours), len(chunk), placeholder)
        for row in fetch(sql, [*owner, *hours, *chunk]):
            digest = bytes(row[0])
            merge(totals[by_hash[digest]], read_values(row[1:]))
            stored_rows.add(digest)
    # a row already there is updated in place (one look-up, its key's columns not bound again),
    # a new one inserted; were one gone after all, all are upserted (the values are the new sums)
    updates = [
        [*value_parameters(totals[key], sqlite), *owner, *((key[0],) if sqlite else ()), digest]
        for digest, key in hashed
        if digest in stored_rows
    ]
    if updates and executemany(update_sql(table, len(owner), sqlite), updates).rowcount != len(updates):
        stored_rows.clear()
    upserts = [
        [*owner, *parameters(digest, key, totals[key], sqlite)] for digest, key in hashed if digest not in stored_rows
    ]
    if upserts:
        executemany(upsert_sql(table, len(owner), sqlite), upserts)
    return {(table, digest): totals[key] for digest, key in hashed}


def write_periods(
    totals: dict[Key, Values],
    owner: tuple[Any, ...],
    fetch: Callable[[str, list[Any]], Iterable[Sequence[Any]]],
    executemany: Callable[[str, list[list[Any]]], Any],
    *,
    sqlite: bool,
    tables: Iterable[str] = tuple(PERIODS),
    known: Mapping[tuple[str, bytes], Values] | None = None,
) -> dict[tuple[str, bytes], Values]:
    """``write`` hourly ``totals`` into each rollup table of ``tables``, added up by its period."""
    # each period's sums first: writing adds the stored values into the hourly totals
    periods = {table: in_periods(totals, PERIODS[table]) for table in tables}
    written: dict[tuple[str, bytes], Values] = {}
    for table, found in periods.items():
        written.update(write(found, owner, fetch, executemany, sqlite=sqlite, table=table, known=known))
    return written


# --- the writer's batches: hourly rollups per batch, each closed day folded into the daily table once ---

#: Each store's (PostgreSQL: each instance's) watermark: ``rollups_daily`` holds the complete
#: sums of its rows for every UTC day before ``daily_before`` (epoch seconds, a day's start).
WATERMARKS = "rollup_watermarks"
DAY = PERIODS["rollups_daily"]
#: A day is folded once a batch holds an hour this long after its end (a row of that day
#: arriving later is a late row: added to both tables, as a row before the watermark is).
GRACE = 3600
#: Bounded work per batch: it folds at most this many days with rollups (the empty days between
#: them are skipped over), and no further day once it has read this many hourly rollup rows;
#: the next batch goes on.
FOLD_DAYS = 7
FOLD_ROWS = 20_000
_WATERMARK = (WATERMARKS, b"")  # the watermark's place among a writer's ``known`` rows


def keep(
    totals: dict[Key, Values],
    owner: tuple[Any, ...],
    fetch: Callable[[str, list[Any]], Iterable[Sequence[Any]]],
    executemany: Callable[[str, list[list[Any]]], Any],
    *,
    sqlite: bool,
    known: Mapping[tuple[str, bytes], Any] | None = None,
    may_delete: bool = True,
) -> dict[tuple[str, bytes], Any]:
    """A batch's hourly ``totals`` into the rollups, inside the rows' transaction.

    Every row goes to the hourly table; a row of a day before the watermark (a late row, an
    import, a row without a start time) to the daily one too. A store's first batch with a
    start time sets the watermark to that batch's first day (nothing before it exists). Then,
    when the batch holds an hour ``GRACE`` past the watermark's day, the closed days are
    folded (``fold``). Returns what was written, for ``known`` once committed (``write``)."""
    stored = None if known is None else known.get(_WATERMARK)
    watermark = stored if stored is not None else read_watermark(owner, fetch, sqlite)
    hours = [key[0] for key in totals if key[0] != -math.inf]
    if watermark is None and hours:
        watermark = period_of(min(hours), DAY)
        executemany(watermark_sql(len(owner), sqlite, insert=True), [[*owner, watermark]])
    late = {key: values for key, values in totals.items() if watermark is None or key[0] < watermark}
    daily = in_periods(late, DAY) if late else {}  # first: writing adds the stored values into ``totals``
    written: dict[tuple[str, bytes], Any] = {}
    written.update(write(totals, owner, fetch, executemany, sqlite=sqlite, known=known))
    if daily:
        written.update(write(daily, owner, fetch, executemany, sqlite=sqlite, table="rollups_daily", known=known))
    if watermark is not None and hours:
        watermark = fold(max(hours), watermark, owner, fetch, executemany, sqlite=sqlite, may_delete=may_delete)
    if watermark is not None:
        written[_WATERMARK] = watermark
    return written


def fold(
    latest: float,
    watermark: float,
    owner: tuple[Any, ...],
    fetch: Callable[[str, list[Any]], Iterable[Sequence[Any]]],
    executemany: Callable[[str, list[list[Any]]], Any],
    *,
    sqlite: bool,
    may_delete: bool = True,
) -> float:
    """Fold the closed days from ``watermark`` on from the hourly table into the daily one, a
    day at a time (days without rollups skipped), up to ``FOLD_DAYS`` days or until
    ``FOLD_ROWS`` hourly rows were read; the new watermark (stored)."""
    closed = period_of(latest - GRACE, DAY)  # every day before it has ended, an hour ago at least
    folded, read = watermark, 0
    for _ in range(FOLD_DAYS):
        if folded >= closed or read >= FOLD_ROWS:
            break
        folded, rows = _fold_day(closed, folded, owner, fetch, executemany, sqlite=sqlite, may_delete=may_delete)
        read += rows
    if folded != watermark:
        executemany(watermark_sql(len(owner), sqlite), [[folded, *owner]])
    return folded


def _fold_day(
    closed: float,
    watermark: float,
    owner: tuple[Any, ...],
    fetch: Callable[[str, list[Any]], Iterable[Sequence[Any]]],
    executemany: Callable[[str, list[list[Any]]], Any],
    *,
    sqlite: bool,
    may_delete: bool,
) -> tuple[float, int]:
    """Fold the first day from ``watermark`` (before ``closed``) that has hourly rollups, and
    the empty days before it; the new watermark and the hourly rows read.

    The daily rows of those days are replaced, never added to: a database upgraded from
    daily rollups kept per batch has its latest day's there, and they go stale. A stale row
    whose key no hourly row has any more is deleted (zeroed when the role may not DELETE)."""
    p = "?" if sqlite else "%s"
    mine = "".join(f"instance_id = {p} AND " for _ in owner)
    span = f"{mine}hour >= {p} AND hour < {p}"
    first = next(iter(fetch(f"SELECT min(hour) FROM rollups WHERE {span}", [*owner, watermark, closed])))[0]
    new = closed if first is None else period_of(float(first), DAY) + DAY
    hours: dict[Key, Values] = {}
    if first is not None:
        columns = ", ".join(KEY_COLUMNS + VALUE_COLUMNS)
        for row in fetch(f"SELECT {columns} FROM rollups WHERE {span}", [*owner, watermark, new]):
            hours[stored_key(row)] = read_values(row[len(KEY_COLUMNS) :])
    days: dict[Key, Values] = {}
    for key, values in hours.items():  # in_periods, adopting each day's first values (read here, not shared)
        day = (period_of(key[0], DAY), *key[1:])
        if day in days:
            merge(days[day], values)
        else:
            days[day] = values
    hashed = sorted((storable_key(key), key) for key in days)
    fresh = {digest for digest, _ in hashed}
    stale = [
        [*owner, row[0], bytes(row[1])]
        for row in fetch(f"SELECT hour, key FROM rollups_daily WHERE {span}", [*owner, watermark, new])
        if bytes(row[1]) not in fresh
    ]
    if stale:
        if may_delete:
            executemany(f"DELETE FROM rollups_daily WHERE {mine}hour = {p} AND key = {p}", stale)
        else:
            zero = ", ".join(f"{c} = {0 if c in COUNTS else 'NULL'}" for c in COUNTS + SUMS + DECIMALS)
            empties = ", ".join(f"{c} = {p}" for c in HISTOGRAMS)
            executemany(
                f"UPDATE rollups_daily SET {zero}, {empties} WHERE {mine}hour = {p} AND key = {p}",
                [["{}"] * len(HISTOGRAMS) + row for row in stale],
            )
    if hashed:
        executemany(
            upsert_sql("rollups_daily", len(owner), sqlite),
            [[*owner, *parameters(digest, key, days[key], sqlite)] for digest, key in hashed],
        )
    return new, len(hours)


def stored_key(row: Sequence[Any]) -> Key:
    """A rollup key as read back from its columns (PostgreSQL's ``labels`` jsonb as the
    canonical JSON text it was written as)."""
    key = list(row[: len(KEY_COLUMNS)])
    key[0] = float(key[0])
    labels = key[_LABELS]
    if labels is not None and not isinstance(labels, str):
        key[_LABELS] = canonical_json(labels)
    return tuple(key)


_LABELS = KEY_COLUMNS.index("labels")


def read_watermark(
    owner: tuple[Any, ...], fetch: Callable[[str, list[Any]], Iterable[Sequence[Any]]], sqlite: bool
) -> float | None:
    """The store's (instance's) watermark; None before its first batch with a start time."""
    found = list(fetch(watermark_sql(len(owner), sqlite, read=True), list(owner)))
    return float(found[0][0]) if found else None


@functools.cache
def watermark_sql(owned: int, sqlite: bool, *, read: bool = False, insert: bool = False) -> str:
    """Read, insert (its parameters: owner, value) or update (value, owner) a watermark."""
    p = "?" if sqlite else "%s"
    where = " WHERE instance_id = " + p if owned else ""
    if read:
        return f"SELECT daily_before FROM {WATERMARKS}{where}"
    if insert:
        return (
            f"INSERT INTO {WATERMARKS} ({'instance_id, ' * owned}daily_before) VALUES ({', '.join([p] * (owned + 1))})"
        )
    return f"UPDATE {WATERMARKS} SET daily_before = {p}{where}"


def watermarks_table_sql(owned: bool, types: Mapping[str, str]) -> str:
    """The watermark table's DDL: one row (PostgreSQL: one row per instance)."""
    owner = f"instance_id {types['text']} PRIMARY KEY, " if owned else ""
    return f"CREATE TABLE {WATERMARKS} ({owner}daily_before {types['real']} NOT NULL)"


def initial_watermarks(fetch: Callable[[str, list[Any]], Iterable[Sequence[Any]]], owned: bool) -> list[list[Any]]:
    """For a database whose daily rollups were kept per batch (complete): each store's
    (instance's) watermark at the day of its latest hourly rollup, that day re-folded later."""
    owner = "instance_id, " if owned else ""
    group = " GROUP BY instance_id" if owned else ""
    found = fetch(f"SELECT {owner}max(hour) FROM rollups WHERE hour > -1e300{group}", [])
    return [[*row[:-1], period_of(float(row[-1]), DAY)] for row in found if row[-1] is not None]


# --- a backlog's rows held back: their rollups written once for them all ---------------------------

#: While more journal lines wait (a backlog), a writer holds back up to this many inserted rows
#: from the rollups and then writes the rollups of them all at once (on the month's mix a batch
#: of ~2,000 rows touches ~800 rollup rows; 20,000 rows touch about as many). ``ROLLED_UP``
#: holds the last row id whose rollups are written, updated in the transaction that writes them:
#: a report reads the rows after it itself, and a writer that restarts reads them back.
HOLD_ROWS = 20_000
ROLLED_UP = "rolled_up"


def rolled_up_table_sql(owned: bool, types: Mapping[str, str]) -> str:
    """The table of the last row id rolled up: one row (PostgreSQL: one per instance)."""
    owner = f"instance_id {types['text']} PRIMARY KEY, " if owned else ""
    return f"CREATE TABLE {ROLLED_UP} ({owner}last_id {types['integer']} NOT NULL)"


@functools.cache
def rolled_up_sql(owned: int, sqlite: bool, *, read: bool = False, insert: bool = False) -> str:
    """Read the last row id rolled up (parameters: owner), insert it if there is none yet
    (owner, id), or set it (id, owner)."""
    p = "?" if sqlite else "%s"
    where = f" WHERE instance_id = {p}" if owned else ""
    if read:
        return f"SELECT last_id FROM {ROLLED_UP}{where}"
    if insert:
        columns = "instance_id, last_id" if owned else "last_id"
        conflict = " ON CONFLICT (instance_id) DO NOTHING" if owned else ""
        return f"INSERT INTO {ROLLED_UP} ({columns}) VALUES ({', '.join([p] * (owned + 1))}){conflict}"
    return f"UPDATE {ROLLED_UP} SET last_id = {p}{where}"


@functools.cache
def held_rows_sql(owned: int, sqlite: bool) -> str:
    """The source values and labels of a store's (instance's) rows after an id, in id order."""
    p = "?" if sqlite else "%s"
    mine = f"instance_id = {p} AND " if owned else ""
    return f"SELECT {', '.join(SOURCE_COLUMNS)}, labels FROM exchanges WHERE {mine}id > {p} ORDER BY id"


def release(held: list, more: bool) -> bool:
    """Whether a writer writes the rollups of the rows it holds now: when no more lines wait,
    or it holds ``HOLD_ROWS``."""
    return bool(held) and (not more or len(held) >= HOLD_ROWS)


#: How many rollup rows a writer remembers as it wrote them (about 1 kB each), before it forgets them all.
KNOWN_ROWS = 20_000


def remember(known: dict[tuple[str, bytes], Values], written: Mapping[tuple[str, bytes], Values]) -> None:
    """After a commit: ``written`` is what the rollup rows now hold."""
    if len(known) + len(written) > KNOWN_ROWS:
        known.clear()
    known.update(written)


@functools.cache
def upsert_sql(table: str, owned: int, sqlite: bool) -> str:
    """One rollup row written with its values already added to the stored ones."""
    columns = [*("instance_id",) * owned, "key", *KEY_COLUMNS, *VALUE_COLUMNS]
    primary = "hour, key" if sqlite else "instance_id, key"
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['?' if sqlite else '%s'] * len(columns))}) "
        f"ON CONFLICT ({primary}) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in VALUE_COLUMNS)
    )


@functools.cache
def update_sql(table: str, owned: int, sqlite: bool) -> str:
    """One stored rollup row's values replaced by their new sums (``value_parameters``, then the
    row's primary key: SQLite's hour and key, PostgreSQL's instance and key)."""
    p = "?" if sqlite else "%s"
    where = f"hour = {p} AND key = {p}" if sqlite else " AND ".join([f"instance_id = {p}"] * owned + [f"key = {p}"])
    return f"UPDATE {table} SET {', '.join(f'{c} = {p}' for c in VALUE_COLUMNS)} WHERE {where}"


@functools.lru_cache(maxsize=256)
def stored_sql(table: str, owned: int, hours: int, keys: int, placeholder: str) -> str:
    """The stored values of up to ``keys`` rollup rows of ``hours`` periods (of one instance)."""
    where = ["instance_id = " + placeholder] * owned
    where.append(f"hour IN ({', '.join([placeholder] * hours)})")
    where.append(f"key IN ({', '.join([placeholder] * keys)})")
    return f"SELECT key, {', '.join(VALUE_COLUMNS)} FROM {table} WHERE {' AND '.join(where)}"


def read_values(stored: Sequence[Any]) -> Values:
    """Values as read back (decimals as text or numeric, histograms as JSON text or jsonb)."""
    values = list(stored)
    for i in range(_DECIMAL_AT, _HISTOGRAM_AT):
        if values[i] is not None:
            values[i] = Decimal(values[i])
    for i in range(_HISTOGRAM_AT, len(values)):
        counts = orjson.loads(values[i]) if isinstance(values[i], str) else values[i] or {}
        values[i] = histogram_of = _counter()
        for index, count in counts.items():
            histogram_of[int(index)] = count
    return values


_INT64 = 2**63


def parameters(digest: bytes, key: Key, values: Values, sqlite: bool) -> list[Any]:
    """An upsert's parameters after its table-key columns (``value_parameters``)."""
    return [digest, *key, *value_parameters(values, sqlite)]


#: A histogram's JSON, its buckets in the text order of their numbers ("10" before "9"): orjson
#: sorts them itself, four times faster than sorting them here (any order reads the same).
_DUMP = functools.partial(orjson.dumps, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SORT_KEYS)


def value_parameters(values: Values, sqlite: bool) -> list[Any]:
    """Values as written: histograms as JSON; in SQLite, decimals as plain text and a sum
    beyond 64 bits (absurd journal values only) as a float, as SQLite's own ``+`` makes it: a
    rollup never costs a batch."""
    written = values[:_HISTOGRAM_AT]
    if sqlite:
        for i in range(_DECIMAL_AT):
            if written[i] is not None and abs(written[i]) >= _INT64:
                written[i] = float(written[i])
        for i in range(_DECIMAL_AT, _HISTOGRAM_AT):
            if written[i] is not None:
                written[i] = format(written[i], "f")
    for counts in values[_HISTOGRAM_AT:]:
        written.append(_DUMP(counts).decode())
    return written
