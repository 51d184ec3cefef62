"""Hourly rollups: the sums ``llmtap report`` reads, kept by the writer beside the rows.

One rollup row per UTC hour x model x provider x app x key fingerprint x status x operation x
family x record schema x instance x cost source x allow-listed labels (and, in PostgreSQL,
x instance_id: each sidecar upserts only its own rollup rows). The stores add a batch's
rollups in the transaction of the rows it inserted, so rollups equal their rows exactly; a
replayed or refused record adds nothing. This module is pure: the key and contribution of a
row (or of a journaled record, read as its row would be), merging, and the histograms.

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

import json
import math
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any

from llmtap.audit.rows import row_builder
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
HISTOGRAMS = ("duration", "ttft")
BUCKETS = 86
_PER_DOUBLING = 4
_FIRST = 0.001  # seconds: the upper bound of bucket 0
BUCKET_COLUMNS = tuple(f"{name}_{i:02d}" for name in HISTOGRAMS for i in range(BUCKETS))
VALUE_COLUMNS = COUNTS + SUMS + DECIMALS + BUCKET_COLUMNS
_SUM_AT = len(COUNTS)
_DECIMAL_AT = _SUM_AT + len(SUMS)
_BUCKET_AT = _DECIMAL_AT + len(DECIMALS)

#: The row columns a rollup reads, with their declared types (a journaled record is read
#: through ``row_builder`` with these, so it counts exactly as its row does).
SOURCE_TYPES = {
    "request_start": "REAL",
    "response_model": "TEXT",
    "request_model": "TEXT",
    "provider": "TEXT",
    "app_id": "TEXT",
    "key_fingerprint": "TEXT",
    "http_status": "INTEGER",
    "error_type": "TEXT",
    "operation": "TEXT",
    "family": "TEXT",
    "record_schema": "INTEGER",
    "instance": "TEXT",
    "cost_source": "TEXT",
    "input_tokens": "INTEGER",
    "output_tokens": "INTEGER",
    "total_tokens": "INTEGER",
    "cached_input_tokens": "INTEGER",
    "reasoning_tokens": "INTEGER",
    "cost_usd": "REAL",
    "cost_nanousd": "INTEGER",
    "cost_savings_usd": "REAL",
    "duration_s": "REAL",
    "ttft_s": "REAL",
}
_as_row = row_builder(SOURCE_TYPES)

Key = tuple
Values = list  # aligned with VALUE_COLUMNS


def sqlite_decimal(value: float) -> Decimal:
    """A REAL amount as the SQLite report sums it: 15 significant digits (every float holds
    them exactly, so 17 x 0.2 / 1e6 counts as 0.0000034)."""
    return Decimal(format(value, ".15g"))


def postgres_decimal(value: float) -> Decimal:
    """A float amount as PostgreSQL's ``numeric`` column stores it (its shortest repr)."""
    return Decimal(repr(value))


def bucket(seconds: float) -> int:
    if seconds < _FIRST:
        return 0
    return min(BUCKETS - 1, 1 + math.floor(_PER_DOUBLING * math.log2(seconds / _FIRST)))


def bucket_bounds(index: int) -> tuple[float, float]:
    """[lower, upper) of a bucket, in seconds."""
    lower = 0.0 if index == 0 else _FIRST * 2 ** ((index - 1) / _PER_DOUBLING)
    upper = math.inf if index == BUCKETS - 1 else _FIRST * 2 ** (index / _PER_DOUBLING)
    return lower, upper


def percentile(counts: list[int], p: float) -> float | None:
    """Nearest-rank percentile of a histogram: the upper bound of the bucket holding the rank
    (the last, open bucket: its lower bound); None for an empty histogram."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = max(1, math.ceil(p * total)), 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank:
            lower, upper = bucket_bounds(index)
            return upper if math.isfinite(upper) else lower
    raise AssertionError("unreachable: the ranks add up to the total")


def label_names(allowed: Iterable[str]) -> str:
    """The allow-list as stored (``key`` in the metric labels is the key fingerprint, always kept)."""
    return canonical_json(sorted({name for name in allowed if name != "key"}))


def key_of(row: Mapping[str, Any], names: list[str], names_text: str) -> Key:
    """The rollup key of a row (a dict of its columns; labels as their parsed JSON value)."""
    start = row["request_start"]
    status = row["http_status"]
    labels = row.get("labels")
    kept = {name: labels[name] for name in names if name in labels} if isinstance(labels, dict) else None
    return (
        None if start is None else start // 3600 * 3600,  # float arithmetic: any finite start
        row["response_model"] if row["response_model"] is not None else row["request_model"],
        row["provider"],
        row["app_id"],
        row["key_fingerprint"],
        str(status) if status is not None else row["error_type"],
        row["operation"],
        row["family"],
        1 if row["record_schema"] is None else row["record_schema"],  # rows before schemas were numbered
        row["instance"],
        row["cost_source"],
        # a lone surrogate made "?", as in the row's own labels text
        canonical_json(kept).encode("utf-8", "replace").decode("utf-8") if kept else None,
        names_text,
    )


def empty() -> Values:
    return [0] * len(COUNTS) + [None] * (len(SUMS) + len(DECIMALS)) + [0] * len(BUCKET_COLUMNS)


def add_row(values: Values, row: Mapping[str, Any], decimal: Callable[[float], Decimal]) -> None:
    """Count one row into ``values``. ``decimal``: how the store sums a float amount exactly
    (``sqlite_decimal`` or ``postgres_decimal``; a ``Decimal`` read from PostgreSQL is taken as is)."""
    cost, cost_source, error = row["cost_usd"], row["cost_source"], row["error_type"]
    values[0] += 1
    if error is not None:
        values[1] += 1
    if cost is None:
        values[2] += cost_source != "deferred"  # as the report counts unknown_cost
        values[3] += error is None  # what the report lists as unpriced
    for offset, name in enumerate(SUMS[:-1]):
        amount = row[name]
        if amount is not None:
            i = _SUM_AT + offset
            values[i] = amount if values[i] is None else values[i] + amount
    if cost is not None:
        nano = row["cost_nanousd"]
        if nano is not None:
            i = _SUM_AT + len(SUMS) - 1
            values[i] = nano if values[i] is None else values[i] + nano
        else:
            amount = cost if isinstance(cost, Decimal) else decimal(cost)
            values[_DECIMAL_AT] = amount if values[_DECIMAL_AT] is None else values[_DECIMAL_AT] + amount
    savings = row["cost_savings_usd"]
    if savings is not None:
        amount = savings if isinstance(savings, Decimal) else decimal(savings)
        i = _DECIMAL_AT + 1
        values[i] = amount if values[i] is None else values[i] + amount
    for offset, name in enumerate(("duration_s", "ttft_s")):
        seconds = row[name]
        if seconds is not None:
            values[_BUCKET_AT + offset * BUCKETS + bucket(seconds)] += 1


def merge(into: Values, other: Values) -> None:
    """Add ``other`` into ``into`` (NULL-preserving for the sums, as SQL's ``sum``)."""
    for i, value in enumerate(other):
        if value is not None:
            into[i] = value if into[i] is None else into[i] + value


def aggregate(
    rows: Iterable[Mapping[str, Any]],
    allowed: Iterable[str],
    decimal: Callable[[float], Decimal],
    *,
    records: bool = False,
) -> dict[Key, Values]:
    """The rollups of ``rows`` (dicts of their columns, labels parsed), or with ``records`` of
    journaled records (read as their rows would be), by key."""
    names_text = label_names(allowed)
    names = json.loads(names_text)
    totals: dict[Key, Values] = {}
    for item in rows:
        row = _as_row(item) if records else item
        if records:
            row["labels"] = item.get("labels")
        key = key_of(row, names, names_text)
        values = totals.get(key)
        if values is None:
            values = totals[key] = empty()
        add_row(values, row, decimal)
    return totals


def add_decimals(values: Values, amounts: list[Decimal | None]) -> None:
    """Add amounts (in ``DECIMALS`` order) into ``values``' decimal sums."""
    for offset, amount in enumerate(amounts):
        i = _DECIMAL_AT + offset
        if amount is not None:
            values[i] = amount if values[i] is None else values[i] + amount


def histogram(values: Values, name: str) -> list[int]:
    start = _BUCKET_AT + HISTOGRAMS.index(name) * BUCKETS
    return values[start : start + BUCKETS]


def decimal_of(values: Values, name: str) -> Decimal | None:
    return values[_DECIMAL_AT + DECIMALS.index(name)]


def storable_key(key: Key) -> str:
    """The key as one text (the table's primary key: NULLs compare equal in it)."""
    return json.dumps(key, ensure_ascii=False, separators=(",", ":"))


def table_sql(table_key: tuple[str, ...], types: Mapping[str, str]) -> str:
    """The rollup table's DDL; ``types``: the engine's type of each kind (text, real, integer,
    count, sum, decimal, labels); ``table_key``: the columns before ``key`` in the primary key."""
    kinds = {
        "hour": "real",
        "record_schema": "integer",
        "labels": "labels",
        **dict.fromkeys(COUNTS + BUCKET_COLUMNS, "count"),
        **dict.fromkeys(SUMS, "sum"),
        **dict.fromkeys(DECIMALS, "decimal"),
    }
    columns = [f"{name} {types['text']} NOT NULL" for name in table_key]
    columns.append(f"key {types['text']} NOT NULL")
    columns += [f"{name} {types[kinds.get(name, 'text')]}" for name in KEY_COLUMNS + VALUE_COLUMNS]
    columns.append(f"PRIMARY KEY ({', '.join([*table_key, 'key'])})")
    return f"CREATE TABLE rollups ({', '.join(columns)})"


def upsert_sql(table_key: tuple[str, ...], *, add_decimals: bool, placeholder: str = "?") -> str:
    """One rollup row added into the table. ``add_decimals``: the engine adds decimals itself
    (PostgreSQL's numeric); else the caller has already added the stored ones (SQLite's text)."""
    columns = [*table_key, "key", *KEY_COLUMNS, *VALUE_COLUMNS]
    sets = [f"{c} = rollups.{c} + excluded.{c}" for c in COUNTS + BUCKET_COLUMNS]
    nullable = SUMS + DECIMALS if add_decimals else SUMS
    sets += [f"{c} = coalesce(rollups.{c} + excluded.{c}, rollups.{c}, excluded.{c})" for c in nullable]
    if not add_decimals:
        sets += [f"{c} = coalesce(excluded.{c}, rollups.{c})" for c in DECIMALS]
    return (
        f"INSERT INTO rollups ({', '.join(columns)}) VALUES ({', '.join([placeholder] * len(columns))}) "
        f"ON CONFLICT ({', '.join([*table_key, 'key'])}) DO UPDATE SET {', '.join(sets)}"
    )


_INT64 = 2**63


def parameters(key: Key, values: Values, sqlite: bool) -> list[Any]:
    """An upsert's parameters after its table-key columns. SQLite: decimals as plain text,
    and a sum beyond 64 bits (absurd journal values only) as a float, as SQLite's own ``+``
    makes it: a rollup never costs a batch."""
    if sqlite:
        values = [
            format(v, "f") if isinstance(v, Decimal) else float(v) if isinstance(v, int) and abs(v) >= _INT64 else v
            for v in values
        ]
    return [storable_key(key), *key, *values]
