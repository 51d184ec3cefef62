"""``llmtap report`` and ``llmtap audit ...``: read the audit log, also while the proxy writes.

SQLite is opened read-only (in WAL mode the writer is never blocked by it); PostgreSQL
(``--db postgresql://...``) is read across every instance of a fleet.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sqlite3
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple

import click

from llmtap.audit import rollups
from llmtap.audit.rows import as_hex
from llmtap.audit.sqlite import chain_anchor, connect_readonly
from llmtap.config import is_server_url, redact_url

#: ``--by`` dimensions and the SQL expression each groups by (times are UTC).
DIMENSIONS = {
    "model": "coalesce(response_model, request_model)",
    "provider": "provider",
    "app": "app_id",
    "key": "key_fingerprint",
    "day": "strftime('%Y-%m-%d', request_start, 'unixepoch')",
    "hour": "strftime('%Y-%m-%dT%H:00Z', request_start, 'unixepoch')",
    "status": "coalesce(CAST(http_status AS TEXT), error_type)",
    "instance": "instance",
    "family": "family",
    # rows written before record schemas were numbered carry none: they are schema 1
    "schema": "coalesce(record_schema, 1)",
}
#: The same dimensions in PostgreSQL (a fleet: an unnamed instance shows as its id).
PG_DIMENSIONS = {
    **DIMENSIONS,
    "day": "to_char(request_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "hour": "to_char(request_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:00\"Z\"')",
    "instance": "coalesce(instance, instance_id)",
}
#: The same dimensions over the hourly rollups (``llmtap.audit.rollups``), which hold each
#: row's value of every one but the day and hour, read from the hour's start.
ROLLUP_DIMENSIONS = {
    "model": "model",
    "provider": "provider",
    "app": "app_id",
    "key": "key_fingerprint",
    "day": "strftime('%Y-%m-%d', hour, 'unixepoch')",
    "hour": "hour",  # formatted here (``_hour_text``): strftime over a month's hourly rows took 0.8 s
    "status": "status",
    "instance": "instance",
    "family": "family",
    "schema": "record_schema",
}
_PG_HOUR = "(CASE WHEN hour BETWEEN -2.0e11 AND 9.2e12 THEN to_timestamp(hour) END AT TIME ZONE 'UTC')"
PG_ROLLUP_DIMENSIONS = {
    **ROLLUP_DIMENSIONS,
    "day": f"to_char({_PG_HOUR}, 'YYYY-MM-DD')",
    "instance": "coalesce(instance, instance_id)",
}


def _hour_text(hour: float | None) -> str | None:
    """A rollup's hour as the rows' ``hour`` dimension shows it (None: rows without a start time)."""
    if hour is None or not -62135596800.0 <= float(hour) < 253402300800.0:  # years 1 to 9999
        return None
    return time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(float(hour)))


#: Rollup dimensions read raw and formatted here, and how.
_ROLLUP_FORMATS = {"hour": _hour_text}
METRICS = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "cost_savings_usd",
    "p50_s",
    "p95_s",
    "p99_s",
    "unknown_cost",
)
_SUMS = """count(*) AS requests,
    sum(error_type IS NOT NULL) AS errors,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cost_usd) AS cost_usd,
    sum(cost_savings_usd) AS cost_savings_usd,
    sum(cost_usd IS NULL AND coalesce(cost_source, '') != 'deferred') AS unknown_cost"""
_PG_SUMS = """count(*) AS requests,
    count(*) FILTER (WHERE error_type IS NOT NULL) AS errors,
    sum(input_tokens)::bigint AS input_tokens,
    sum(output_tokens)::bigint AS output_tokens,
    sum(cost_usd) AS cost_usd,
    sum(cost_savings_usd) AS cost_savings_usd,
    count(*) FILTER (WHERE cost_usd IS NULL AND coalesce(cost_source, '') != 'deferred') AS unknown_cost"""
PERCENTILES = (50, 95, 99)
#: Grouping without --by: one row per model (never a lone row repeating the TOTAL).
DEFAULT_BY = "model"
MONEY = ("cost_usd", "cost_savings_usd")
#: With ``--reprice``: the same rows' tokens under the current price data.
REPRICE_METRICS = ("reprice_usd", "reprice_unknown")
#: What ``--reprice`` reads of each row (NULL where an older database lacks the column).
_PRICING_COLUMNS = (
    "request_start",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_input_tokens",
    "cache_write_1h_input_tokens",
    "served_namespace",
    "response_model",
    "request_model",
    "provider",
    "service_tier",
)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class When(click.ParamType):
    """A moment: a duration back from now (``90m``, ``24h``, ``7d``) or an ISO date/time (UTC if naive)."""

    name = "when"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            moment = parse_when(value, time.time())
        except OverflowError:
            self.fail(f"{value!r} is too far from now: dates run from year 1 to 9999", param, ctx)
        except ValueError:
            self.fail(f"{value!r} is neither a duration like 24h or 7d nor an ISO date", param, ctx)
        try:
            datetime.fromtimestamp(moment, UTC)  # a moment a report can print and SQLite compare
        except (OverflowError, OSError, ValueError):
            self.fail(f"{value!r} is too far from now: dates run from year 1 to 9999", param, ctx)
        return moment


def parse_when(text: str, now: float) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if match:
        moment = now - float(match[1]) * _UNITS[match[2]]
        if not math.isfinite(moment):
            raise OverflowError(f"{text!r} is out of range")
        return moment
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class Grouping(NamedTuple):
    names: list[str]  # as the user wrote them: "model", "label:team"
    exprs: list[str]  # SQL expressions
    params: list[str]  # bound parameters of the expressions (label JSON paths)
    formats: tuple[Callable[[Any], Any] | None, ...] = ()  # over rollups: a value read raw, formatted here

    def key(self, values: Sequence[Any]) -> tuple:
        """The group of a result row (its first values), formatted."""
        if not self.formats:
            return tuple(values[: len(self.exprs)])
        return tuple(value if f is None else f(value) for f, value in zip(self.formats, values))


def grouping(by: Sequence[str], postgres: bool = False, *, rollups: bool = False) -> Grouping:
    """``rollups``: the expressions over the rollup table instead of ``exchanges``."""
    names, exprs, params = [], [], []
    if rollups:
        dimensions = PG_ROLLUP_DIMENSIONS if postgres else ROLLUP_DIMENSIONS
    else:
        dimensions = PG_DIMENSIONS if postgres else DIMENSIONS
    for dimension in by:
        if dimension.startswith("label:") and len(dimension) > 6 and '"' not in dimension:
            if postgres:
                exprs.append("labels ->> ?")
                params.append(dimension[6:])
            else:
                exprs.append("json_extract(labels, ?)")
                params.append(f'$."{dimension[6:]}"')
        elif dimension in dimensions:
            exprs.append(dimensions[dimension])
        else:
            raise click.BadParameter(
                f"{dimension!r}: use one of {', '.join(DIMENSIONS)} or label:NAME", param_hint="--by"
            )
        names.append(dimension)
    formats = tuple(_ROLLUP_FORMATS.get(name) for name in names) if rollups else ()
    return Grouping(names, exprs, params, formats if any(formats) else ())


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (a value that really occurred), None for no values."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(p * len(sorted_values)) - 1)]


class _Reader:
    """SQLite or PostgreSQL rows as dicts (in column order), with SQLite's ``?`` placeholders
    either way."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.postgres = not isinstance(conn, sqlite3.Connection)

    def rows(self, sql: str, params: Sequence[Any], *, exact: bool = False) -> list[dict[str, Any]]:
        """``exact``: PostgreSQL's numeric values stay decimals (else floats, as SQLite's)."""
        if not self.postgres:
            cursor = self.conn.execute(sql, params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor]
        with self.conn.cursor() as cur:
            cur.execute(sql.replace("?", "%s"), params)
            names = [d.name for d in cur.description]
            if exact:
                return [dict(zip(names, row)) for row in cur]
            return [{n: _plain(v) for n, v in zip(names, row)} for row in cur]

    def tuples(self, sql: str, params: Sequence[Any]) -> list[tuple]:
        """Rows as tuples (many of them: no dict each), PostgreSQL's numeric values as decimals."""
        if not self.postgres:
            return self.conn.execute(sql, params).fetchall()
        with self.conn.cursor() as cur:
            return cur.execute(sql.replace("?", "%s"), params).fetchall()


def _plain(value: Any) -> Any:
    """numeric sums as floats, like SQLite's (the report prints them; the database keeps them exact)."""
    return float(value) if isinstance(value, Decimal) else value


def _columns(reader: _Reader) -> set[str]:
    if reader.postgres:
        from llmtap.audit.postgres import _columns as pg_columns

        return pg_columns(reader.conn)
    return {row[1] for row in reader.conn.execute("PRAGMA table_info(exchanges)")}


def _nano(amount: Decimal | None) -> int | None:
    return None if amount is None else round(amount.scaleb(9))


class Source(NamedTuple):
    """Where a report reads from: whole days and hours from the rollups, the rest from rows."""

    periods: tuple[tuple[str, float | None, float | None], ...]  # (table, start, end): its periods in [start, end)
    #: row ranges [since, until); a third item, the rows after each store's (instance's) last
    #: rolled-up id ((instance or None, id) pairs): rows a writer has not rolled up yet
    edges: tuple[tuple[Any, ...], ...]
    text: str  # said in the table's title and as JSON's "source"


def plan(
    conn: Any, by: Sequence[str], since: float | None, until: float | None, *, exact: bool = False, why: str = ""
) -> Source:
    """Rollups for the whole days and hours of the range when the grouping allows (a label only
    where every rollup of those periods holds it), rows for the partial hours at its edges; rows
    alone with ``exact`` (``why`` says why)."""
    reader = _Reader(conn)
    everything = Source((), ((since, until),), f"rows{why}")
    tables = _tables(reader, (*rollups.PERIODS, rollups.WATERMARKS, rollups.ROLLED_UP))
    if exact or "rollups" not in tables:
        return everything
    start = None if since is None else math.ceil(since / 3600) * 3600.0
    end = None if until is None else math.floor(until / 3600) * 3600.0
    if start is not None and end is not None and start >= end:
        return Source((), ((since, until),), "rows (less than one whole hour)")
    candidates = [(("rollups", start, end),)]
    if "hour" not in by and "rollups_daily" in tables:
        candidates.insert(0, _days_and_hours(start, end, _daily_before(reader, tables)))
    labels = {name[6:] for name in by if name.startswith("label:")}
    periods = next((periods for periods in candidates if _rolled_up(reader, periods, labels)), None)
    if periods is None:
        return Source((), ((since, until),), "rows (the label is not rolled up for every hour)")
    edges = tuple(edge for edge in ((since, start), (end, until)) if edge[0] is not None and edge[0] != edge[1])
    partial = f" + {len(edges)} partial hour{'s' if len(edges) > 1 else ''} from rows" if edges else ""
    kinds = " and ".join(dict.fromkeys("daily" if table == "rollups_daily" else "hourly" for table, _, _ in periods))
    after, waiting = _not_rolled_up(reader, tables)
    if waiting:
        edges += ((start, end, after),)
        partial += f" + {waiting:,} row{'s' if waiting > 1 else ''} not rolled up yet"
    return Source(periods, edges, f"{kinds} rollups{partial}")


def _not_rolled_up(reader: _Reader, tables: set[str]) -> tuple[tuple[tuple[str | None, int], ...], int]:
    """Each store's (instance's) last rolled-up row id, and how many rows follow them: rows a
    writer holds back from the rollups while it works off a backlog (``rollups.HOLD_ROWS``).
    ``tables``: those this database has (``_tables``)."""
    if rollups.ROLLED_UP not in tables:
        return (), 0
    owner = "instance_id" if reader.postgres else "NULL AS instance_id"
    found = reader.rows(f"SELECT {owner}, last_id FROM {rollups.ROLLED_UP}", [])
    after = tuple((row["instance_id"], row["last_id"]) for row in found)
    if not after:
        return (), 0
    where, params = _after(after)
    return after, reader.rows(f"SELECT count(*) AS n FROM exchanges WHERE {where}", params)[0]["n"]


def _after(after: Sequence[tuple[str | None, int]]) -> tuple[str, list[Any]]:
    """The rows after each store's (instance's) last rolled-up id (through the primary key, or
    PostgreSQL's (instance_id, id) index)."""
    if after[0][0] is None:
        return "id > ?", [after[0][1]]
    return "(" + " OR ".join(["(instance_id = ? AND id > ?)"] * len(after)) + ")", [v for pair in after for v in pair]


def _rolled_up(reader: _Reader, periods: tuple[tuple[str, float | None, float | None], ...], labels: set[str]) -> bool:
    """Whether every rollup of ``periods`` holds these labels (a database upgraded to daily
    rollups has them only in its hourly ones: the upgrade knows no allow-list)."""
    for table, first, last in periods if labels else ():
        where, params = _hours(first, last)
        found = reader.rows(f"SELECT DISTINCT label_names FROM {table} WHERE {where}", params)
        if any(not labels <= set(json.loads(row["label_names"])) for row in found):
            return False
    return True


def _days_and_hours(
    start: float | None, end: float | None, daily_before: float | None = None
) -> tuple[tuple[str, float | None, float | None], ...]:
    """The whole UTC days of [start, end) from the daily rollups (those before ``daily_before``,
    the watermark: the later ones are not folded yet and come from the hourly rollups), the
    hours around them from the hourly ones."""
    first = None if start is None else math.ceil(start / 86400) * 86400.0
    last = None if end is None else math.floor(end / 86400) * 86400.0
    if first is not None and last is not None and first >= last:
        return (("rollups", start, end),)
    before = (("rollups", start, first),) if start is not None and start != first else ()
    after = (("rollups", last, end),) if end is not None and end != last else ()
    days: tuple[tuple[str, float | None, float | None], ...] = (("rollups_daily", first, last),)
    if daily_before is not None and (last is None or daily_before < last):
        cut = daily_before if first is None else max(first, daily_before)
        days = (("rollups", cut, last),)
        if first is None or first < cut:
            # a range open at both ends holds the rows without a start time (hour -inf): in the daily part
            days = (("rollups_daily", -math.inf if first is None and last is None else first, cut), *days)
    return (*before, *days, *after)


def _daily_before(reader: _Reader, tables: set[str]) -> float | None:
    """The daily rollups' watermark (``rollups.keep``): whole days before it are complete there
    (in PostgreSQL, for every instance: the earliest instance's). None: complete throughout (no
    store has one yet, or a database not migrated to watermarks, whose daily rollups were kept
    per batch). ``tables``: those this database has (``_tables``)."""
    if rollups.WATERMARKS not in tables:
        return None
    return reader.rows(f"SELECT min(daily_before) AS daily_before FROM {rollups.WATERMARKS}", [])[0]["daily_before"]


def _tables(reader: _Reader, names: Sequence[str]) -> set[str]:
    """Which of these tables this database has (an older one lacks the rollup tables, or some)."""
    if reader.postgres:
        found = "SELECT to_regclass(?) IS NOT NULL AS found"
        return {table for table in names if reader.rows(found, [table])[0]["found"]}
    sql = f"SELECT name FROM sqlite_master WHERE name IN ({', '.join('?' * len(names))})"
    return {row["name"] for row in reader.rows(sql, list(names))}


def _hours(start: float | None, end: float | None) -> tuple[str, list[float]]:
    """The rollups of the hours in [start, end); rows without a start time roll up under hour
    -inf, which only a range open at both ends includes (as a row scan would)."""
    where, params = ["1 = 1"], []
    if start is not None:
        where.append("hour >= ?")
        params.append(start)
    elif end is not None:
        where.append("hour > ?")
        params.append(-math.inf)
    if end is not None:
        where.append("hour < ?")
        params.append(end)
    return " AND ".join(where), params


def _rows_where(
    since: float | None, until: float | None, after: Sequence[tuple[str | None, int]] = ()
) -> tuple[str, list[Any]]:
    where, params = ["1 = 1"], []
    start = "+request_start" if after else "request_start"  # rows after an id: found by id, not by time
    if since is not None:
        where.append(f"{start} >= ?")
        params.append(since)
    if until is not None:
        where.append(f"{start} < ?")
        params.append(until)
    if after:
        rows, ids = _after(after)
        where.append(rows)
        params += ids
    return " AND ".join(where), params


def pruned_before(conn: Any) -> float | None:
    """The latest retention cutoff: rows that started before it are gone (their rollups stay)."""
    return _Reader(conn).rows("SELECT max(cutoff) AS cutoff FROM pruned", [])[0]["cutoff"]


def spend(
    conn: Any,
    by: Sequence[str],
    since: float | None,
    until: float | None,
    reprice: Any = None,
    source: Source | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows per group and the totals row, as plain dicts (group names first, then METRICS).

    ``source``: where to read (``plan``); rows alone when None. From rollups, a percentile is
    the upper bound of its histogram bucket (``llmtap.audit.rollups``), at most 19% above the
    exact value; every other number is the same as from rows.

    Money is summed exactly: a row's ``cost_nanousd`` (integer nano-dollars) where it has one,
    else its float ``cost_usd`` as a decimal (rows of an older llmtap). Each row and the totals
    also carry ``cost_nanousd``, the sum in nano-dollars.

    ``reprice``: a ``llmtap.pricing.cost.Pricer``; each group then also has ``reprice_usd``
    (its rows' tokens priced by it, at each row's own time) and ``reprice_unknown``.
    """
    reader = _Reader(conn)
    if source is not None and source.periods:
        return _spend_rollups(reader, by, source)
    group = grouping(by, reader.postgres)
    sums_sql = _PG_SUMS if reader.postgres else _SUMS
    columns = _columns(reader)
    where_sql, where_params = _rows_where(since, until)
    keys = [f"g{i}" for i in range(len(group.exprs))]
    select = "".join(f"{expr} AS {key}, " for expr, key in zip(group.exprs, keys))
    order = f"GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}" if keys else ""
    if reader.postgres and keys:  # PostgreSQL groups by the expressions (a placeholder repeats)
        order = f"GROUP BY {', '.join(str(i + 1) for i in range(len(keys)))} ORDER BY {', '.join(keys)}"
    sums = reader.rows(
        f"SELECT {select}{sums_sql} FROM exchanges WHERE {where_sql} {order}", [*group.params, *where_params]
    )
    totals = reader.rows(f"SELECT {sums_sql} FROM exchanges WHERE {where_sql}", where_params)[0]
    latencies: dict[tuple, list[float]] = defaultdict(list)
    # money is summed here as decimals (SQLite's float sum adds noise such as 0.0008649999999999999;
    # PostgreSQL's numeric comes back exact)
    money: dict[tuple, dict[str, Decimal]] = defaultdict(dict)
    money_cols = ", ".join(MONEY) + (", cost_nanousd" if "cost_nanousd" in columns else ", NULL AS cost_nanousd")
    for row in reader.rows(
        f"SELECT {select}duration_s, {money_cols} FROM exchanges WHERE {where_sql}",
        [*group.params, *where_params],
        exact=True,
    ):
        values = tuple(row.values())
        key, duration, amounts = values[: len(keys)], values[len(keys)], values[len(keys) + 1 : -1]
        if duration is not None:
            latencies[key].append(duration)
        for name, amount in zip(MONEY, amounts):
            if amount is not None:
                if name == "cost_usd" and values[-1] is not None:  # the exact amount
                    amount = Decimal(values[-1]).scaleb(-9)
                exact = amount if isinstance(amount, Decimal) else _decimal(amount)
                money[key][name] = money[key].get(name, Decimal(0)) + exact
    everything = sorted(v for values in latencies.values() for v in values)
    totals.update({f"p{p}_s": percentile(everything, p / 100) for p in PERCENTILES})
    for name in MONEY:
        parts = [sums[name] for sums in money.values() if name in sums]
        totals[name] = float(sum(parts, Decimal(0))) if parts else None
        if name == "cost_usd":
            totals["cost_nanousd"] = _nano(sum(parts, Decimal(0))) if parts else None
    rows = []
    for row in sums:
        key = tuple(row[k] for k in keys)
        values = sorted(latencies.get(key, ()))
        rows.append(
            {
                **dict(zip(group.names, key)),
                **{m: row[m] for m in METRICS if m in row},
                **{name: float(money[key][name]) if name in money[key] else None for name in MONEY},
                "cost_nanousd": _nano(money[key].get("cost_usd")),
                **{f"p{p}_s": percentile(values, p / 100) for p in PERCENTILES},
            }
        )
    total_row = {
        **dict.fromkeys(group.names),
        **{m: totals[m] for m in METRICS},
        "cost_nanousd": totals["cost_nanousd"],
    }
    if reprice is not None:
        _reprice(reader, group, keys, select, where_sql, where_params, columns, reprice, rows, total_row)
    return rows, total_row


def _spend_rollups(reader: _Reader, by: Sequence[str], source: Source) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``spend`` from the rollups of whole days and hours plus the rows of the partial hours, counted by
    the same ``rollups.values_of`` the writer uses."""
    groups: dict[tuple, rollups.Values] = defaultdict(rollups.empty)
    group = grouping(by, reader.postgres, rollups=True)
    keys = [f"g{i}" for i in range(len(group.exprs))]
    select = "".join(f"{expr} AS {key}, " for expr, key in zip(group.exprs, keys))
    by_sql = f"GROUP BY {', '.join(str(i + 1) for i in range(len(keys)))}" if keys else ""
    summed = rollups.COUNTS + rollups.SUMS
    sums = ", ".join(f"sum({c}) AS {c}" for c in summed)
    # exact decimals: PostgreSQL's numeric adds them; SQLite's are text, joined per group and added here
    joined = ", ".join(f"{'sum' if reader.postgres else 'group_concat'}({name})" for name in rollups.DECIMALS)
    each = "jsonb_each_text" if reader.postgres else "json_each"
    count = "(j.value)::int" if reader.postgres else "j.value"
    for table, start, end in source.periods:
        where, params = _hours(start, end)
        for values in reader.tuples(
            f"SELECT {select}{sums}, {joined} FROM {table} WHERE {where} {by_sql}", [*group.params, *params]
        ):
            if not values[len(keys)]:  # no requests
                continue
            found = dict(zip(summed, [int(v) if isinstance(v, Decimal) else v for v in values[len(keys) : -2]]))
            for name, amount in zip(rollups.DECIMALS, values[-2:]):
                if amount is not None:
                    found[name] = amount if isinstance(amount, Decimal) else sum(map(Decimal, amount.split(",")))
            rollups.merge(groups[group.key(values)], [found.get(c) for c in rollups.VALUE_COLUMNS])
        # the latency histogram, bucket by bucket (a rollup row holds a few: JSON objects, summed by the engine)
        for values in reader.tuples(
            f"SELECT {select}CAST(j.key AS INTEGER) AS bucket, sum({count}) AS n FROM {table}, {each}({table}.duration) AS j "
            f"WHERE {where} GROUP BY {', '.join(str(i + 1) for i in range(len(keys) + 1))}",
            [*group.params, *params],
        ):
            rollups.histogram(groups[group.key(values)], "duration")[values[-2]] += int(values[-1])
    rows_group = grouping(by, reader.postgres)
    columns = _columns(reader)
    wanted = [c if c in columns else f"NULL AS {c}" for c in rollups.SOURCE_COLUMNS]
    decimal = rollups.postgres_decimal if reader.postgres else rollups.sqlite_decimal
    row_select = "".join(f"{expr} AS {key}, " for expr, key in zip(rows_group.exprs, keys))
    edge_rows: dict[tuple, list] = defaultdict(list)
    for edge in source.edges:
        edge_where, edge_params = _rows_where(*edge)
        sql = f"SELECT {row_select}{', '.join(wanted)} FROM exchanges WHERE {edge_where}"
        for row in reader.rows(sql, [*rows_group.params, *edge_params], exact=True):
            values = tuple(row.values())
            edge_rows[values[: len(keys)]].append(values[len(keys) :])
    for key, sources in edge_rows.items():
        rollups.merge(groups[key], rollups.values_of(sources, decimal))
    total = rollups.empty()
    for values in groups.values():
        rollups.merge(total, values)
    order = sorted(groups, key=lambda key: tuple(_order(v, reader.postgres) for v in key))
    rows = [{**dict(zip(by, key)), **_metrics(groups[key])} for key in order]
    return rows, {**dict.fromkeys(by), **_metrics(total)}


def _order(value: Any, postgres: bool) -> tuple:
    """The engine's ORDER BY of one group value: SQLite's NULLs first, then numbers, then
    text; PostgreSQL's NULLs last."""
    if value is None:
        return (3,) if postgres else (0,)
    return (1, value) if isinstance(value, (int, float)) else (2, value)


def _metrics(values: rollups.Values) -> dict[str, Any]:
    """A group's METRICS (and ``cost_nanousd``) from its rollup values."""
    found = dict(zip(rollups.VALUE_COLUMNS, values))
    nano, older = found["cost_nanousd"], found["cost_decimal_usd"]
    cost = None if nano is None and older is None else Decimal(nano or 0).scaleb(-9) + (older or Decimal(0))
    savings = found["cost_savings_usd"]
    durations = rollups.histogram(values, "duration")
    return {
        **{m: found[m] for m in ("requests", "errors", "input_tokens", "output_tokens", "unknown_cost")},
        "cost_usd": None if cost is None else float(cost),
        "cost_savings_usd": None if savings is None else float(savings),
        **{f"p{p}_s": rollups.percentile(durations, p / 100) for p in PERCENTILES},
        "cost_nanousd": _nano(cost),
    }


def _reprice(
    reader: _Reader,
    group: Grouping,
    keys: list[str],
    select: str,
    where_sql: str,
    where_params: list[Any],
    columns: set[str],
    pricer: Any,
    rows: list[dict[str, Any]],
    totals: dict[str, Any],
) -> None:
    """Each row's tokens priced again under ``pricer`` at the row's own time; rows untouched.

    Every row is repriced from its tokens, reported ones too: beside a router's reported
    charge this shows what the price data says the same tokens cost.
    """
    wanted = ", ".join(c if c in columns else f"NULL AS {c}" for c in _PRICING_COLUMNS)
    sums: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])  # nano-dollars, rows left unknown
    for row in reader.rows(f"SELECT {select}{wanted} FROM exchanges WHERE {where_sql}", [*group.params, *where_params]):
        values = tuple(row.values())
        priced = pricer.price(dict(zip(_PRICING_COLUMNS, values[len(keys) :])))
        acc = sums[values[: len(keys)]]
        if priced["cost_nanousd"] is None:
            acc[1] += 1
        else:
            acc[0] += priced["cost_nanousd"]
    for row in rows:
        nano, unknown = sums.get(tuple(row[name] for name in group.names), (0, 0))
        row.update(reprice_usd=nano / 1e9, reprice_nanousd=nano, reprice_unknown=unknown)
    nano, unknown = sum(v[0] for v in sums.values()), sum(v[1] for v in sums.values())
    totals.update(reprice_usd=nano / 1e9, reprice_nanousd=nano, reprice_unknown=unknown)


def unpriced(conn: Any, since: float | None, until: float | None, source: Source | None = None) -> list[dict[str, Any]]:
    """Successful exchanges whose cost is unknown, per model and provider, most first."""
    reader = _Reader(conn)
    source = source or Source((), ((since, until),), "rows")
    counts: dict[tuple, int] = defaultdict(int)
    for table, start, end in source.periods:
        where, params = _hours(start, end)
        for row in reader.rows(
            f"SELECT model, provider, sum(unpriced) AS n FROM {table} WHERE unpriced > 0 AND {where} GROUP BY 1, 2",
            params,
        ):
            counts[row["model"], row["provider"]] += int(row["n"])
    for edge in source.edges:
        where, params = _rows_where(*edge)
        for row in reader.rows(
            "SELECT coalesce(response_model, request_model) AS model, provider, count(*) AS n FROM exchanges "
            f"WHERE cost_usd IS NULL AND error_type IS NULL AND {where} GROUP BY 1, 2",
            params,
        ):
            counts[row["model"], row["provider"]] += row["n"]
    found = [{"model": model, "provider": provider, "requests": n} for (model, provider), n in counts.items() if n]
    return sorted(
        found,
        key=lambda m: (-m["requests"], _order(m["model"], reader.postgres), _order(m["provider"], reader.postgres)),
    )


def _open(db: str) -> Any:
    """A read connection: SQLite read-only, or PostgreSQL (read-only transactions)."""
    if is_server_url(db):
        from llmtap.audit import postgres

        try:
            conn = postgres.connect(db)
            conn.read_only = True
            return conn
        except Exception as exc:
            raise click.ClickException(f"{redact_url(db)}: {exc}") from exc
    try:
        return connect_readonly(db)
    except (OSError, ValueError, sqlite3.Error) as exc:
        raise click.ClickException(str(exc)) from exc


@click.command()
@click.option(
    "--db",
    default="./llmtap.db",
    show_default=True,
    envvar="LLMTAP_DB",
    help="The audit log: a file or postgresql:// URL.",
)
@click.option("--since", type=When(), help="Start: a duration back from now (24h, 7d) or an ISO date (UTC).")
@click.option("--until", type=When(), help="End (exclusive), same forms as --since.")
@click.option(
    "--by",
    multiple=True,
    metavar="DIMENSION",
    help=f"Group by {', '.join(DIMENSIONS)} or label:NAME. Repeatable.  [default: {DEFAULT_BY}]",
)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option(
    "--reprice",
    is_flag=True,
    help="Also show what each group's tokens cost under the current price data, at each exchange's own time "
    "(rows are never modified).",
)
@click.option(
    "--exact",
    is_flag=True,
    help="Scan the rows (exact percentiles) instead of reading whole hours from the hourly rollups.",
)
@click.option("--prices", "prices_file", default="", help="With --reprice: your own prices file (YAML or JSON).")
@click.option("--price-data", default="", help="With --reprice: a genai-prices data file instead of the bundled data.")
def report(
    db: str,
    since: float | None,
    until: float | None,
    by: tuple[str, ...],
    fmt: str,
    reprice: bool,
    exact: bool,
    prices_file: str,
    price_data: str,
) -> None:
    """Spend report from the audit log: requests, errors, tokens, USD and latency per group.

    A cost sum that leaves out exchanges of unknown cost says so (``0.12 + 3 unknown`` in the
    table; the ``unknown_cost`` column in every format). Money is summed as exact decimals.
    The models whose cost is unknown are listed (JSON: ``unpriced``). Whole hours are read
    from the hourly rollups the writer keeps, the partial hours at the range's edges from rows
    (the title and JSON's ``source`` say which); ``--exact`` and ``--reprice`` scan the rows.
    """
    group = grouping(by or (DEFAULT_BY,), is_server_url(db))  # validate before opening anything
    pricer = _pricer(prices_file, price_data) if reprice else None
    conn = _open(db)
    try:
        why = " (--reprice prices each row)" if reprice else ""
        source = plan(conn, group.names, since, until, exact=exact or reprice, why=why)
        gone = pruned_before(conn)
        if gone is not None and any(edge[0] is None or edge[0] < gone for edge in source.edges if len(edge) == 2):
            source = source._replace(text=f"{source.text}; rows before {_when(gone)} were deleted by retention")
        rows, totals = spend(conn, group.names, since, until, pricer, source)
        missing = unpriced(conn, since, until, source)
    finally:
        conn.close()
    metrics = [*METRICS, *REPRICE_METRICS] if reprice else list(METRICS)
    if not rows and fmt != "table":
        click.echo(f"llmtap report: no exchanges {_range(since, until)} in {redact_url(db)}", err=True)
    if fmt == "json":
        document = {"since": since, "until": until, "by": group.names, "source": source.text}
        document.update(rows=rows, totals=totals)
        document["unpriced"] = missing
        if pricer is not None:
            document["price_version"] = pricer.version
        click.echo(json.dumps(document, indent=2))  # a float's repr: 0.000865, never 0.0008649999999999999
    elif fmt == "csv":
        # RFC 4180 line ends: a cell holding a CR is then quoted too, so it cannot break a row
        writer = csv.writer(sys.stdout, lineterminator="\r\n")
        writer.writerow([*group.names, *metrics])
        for row in rows:
            writer.writerow([*(_csv_text(row[c]) for c in group.names), *(_csv(m, row[m]) for m in metrics)])
        writer.writerow([*_total_label(group.names), *(_csv(m, totals[m]) for m in metrics)])
    elif not rows:
        click.echo(f"No exchanges {_range(since, until)} in {redact_url(db)}.")
    else:
        _print_table(group.names, rows, totals, since, until, source.text, pricer.version if pricer else None)
        if missing:
            listed = ", ".join(
                f"{m['model'] or '(no model)'} ({m['provider'] or '?'}) ×{m['requests']:,}" for m in missing[:20]
            )
            more = f", and {len(missing) - 20} more" if len(missing) > 20 else ""
            click.echo(f"Cost unknown (no price in any source): {listed}{more}")


def _pricer(prices_file: str, price_data: str) -> Any:
    from llmtap.pricing.cost import Pricer, PricesFileError

    try:
        return Pricer.load(prices_file or None, price_data or None)
    except PricesFileError as exc:
        raise click.ClickException(str(exc)) from exc
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{price_data}: not a genai-prices data file: {exc}") from exc


def _decimal(value: Decimal | float | int | str) -> Decimal:
    """A stored amount as a decimal: a float to 15 significant digits, which every float holds
    exactly, so that a computed 17 x 0.2 / 1e6 = 3.4000000000000003e-06 counts as 0.0000034;
    PostgreSQL's numeric as it is."""
    return Decimal(value) if isinstance(value, str) else rollups.sqlite_decimal(value)


def _money_text(value: float) -> str:
    """Plain decimal notation, no float noise and no exponent: 1e-05 -> 0.00001."""
    return format(_decimal(value), "f")


def _csv(column: str, value: Any) -> Any:
    if value is None:
        return ""
    return _money_text(value) if column in MONEY or column == "reprice_usd" else value


def _total_label(names: Sequence[str]) -> list[str]:
    return ["TOTAL", *[""] * (len(names) - 1)]


def _range(since: float | None, until: float | None) -> str:
    def when(ts: float) -> str:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    if since is None and until is None:
        return "recorded"
    if until is None:
        return f"since {when(since)}"
    if since is None:
        return f"before {when(until)}"
    return f"from {when(since)} to {when(until)}"


#: What makes a spreadsheet read a cell as a formula (OWASP, "CSV Injection").
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_text(value: Any) -> Any:
    """A text cell (a model, an app, a label: values that apps and upstreams choose) made safe
    to open in a spreadsheet: one that starts like a formula is prefixed with ``'``, as the
    OWASP guidance on CSV injection says. Numbers are never changed."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return "" if value is None else value


def _print_table(
    names: list[str],
    rows: list[dict[str, Any]],
    totals: dict[str, Any],
    since: float | None,
    until: float | None,
    source: str,
    reprice_version: str | None = None,
) -> None:
    from rich.console import Console
    from rich.table import Table

    def when(ts: float | None, default: str) -> str:
        return default if ts is None else _when(ts)

    table = Table(
        title=f"llmtap spend by {', '.join(names)}, {when(since, 'start')} to {when(until, 'now')} (from {source})",
        title_justify="left",
    )
    for name in names:
        table.add_column(name, overflow="fold")
    for header in (
        "requests",
        "errors",
        "in tokens",
        "out tokens",
        "cost USD",
        "saved USD",
        "p50",
        "p95",
        "p99",
        "unknown_cost",
        *((f"repriced USD ({reprice_version})", "no reprice") if reprice_version is not None else ()),
    ):
        table.add_column(header, justify="right", no_wrap=True)

    def cells(row: dict[str, Any]) -> list[str]:
        if reprice_version is None:
            return _metric_cells(row)
        return [*_metric_cells(row), _usd(row["reprice_usd"], row["reprice_unknown"]), f"{row['reprice_unknown']:,}"]

    for i, row in enumerate(rows):
        table.add_row(*[_cell(row[n]) for n in names], *cells(row), end_section=i == len(rows) - 1)
    table.add_row(*_total_label(names), *cells(totals), style="bold")
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # piped: don't cut columns


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _metric_cells(row: dict[str, Any]) -> list[str]:
    return [
        f"{row['requests']:,}",
        f"{row['errors'] or 0:,}",
        _count(row["input_tokens"]),
        _count(row["output_tokens"]),
        _usd(row["cost_usd"], row["unknown_cost"] or 0),
        _usd(row["cost_savings_usd"]),
        _seconds(row["p50_s"]),
        _seconds(row["p95_s"]),
        _seconds(row["p99_s"]),
        f"{row['unknown_cost'] or 0:,}",
    ]


def _cell(value: Any) -> str:
    return "(none)" if value is None else str(value)


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _usd(value: Decimal | float | None, unknown: int = 0) -> str:
    """A sum, marked partial when it leaves out ``unknown`` exchanges: ``0.123456 + 3 unknown``."""
    if value is None:
        return f"{unknown:,} unknown" if unknown else "unknown"
    text = f"{value:,.6f}"
    return f"{text} + {unknown:,} unknown" if unknown else text


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


@click.group()
def audit() -> None:
    """Audit log maintenance."""


_DB_HELP = "The audit log: a SQLite file, or a postgresql:// URL (password from PGPASSWORD or .pgpass)."


@audit.command()
@click.option("--db", default="./llmtap.db", show_default=True, envvar="LLMTAP_DB", help=_DB_HELP)
@click.option("--instance", "only", default=None, help="PostgreSQL: check only this instance id's chain.")
@click.option(
    "--against",
    type=click.Path(exists=True, dir_okay=False),
    help="A saved chain head (the writer's `chain head {...}` log lines, or `llmtap audit head` output) to check.",
)
@click.option(
    "--since",
    type=When(),
    help="Check only the rows recorded from then on (a duration or ISO date): the links inside the range, "
    "anchored at its first row's prev_hash.",
)
@click.option("--until", type=When(), help="Check only the rows recorded before then (same forms as --since).")
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    help="Resume after the row saved in FILE (first checking it still holds its hash); save progress there.",
)
def verify(
    db: str, only: str | None, against: str | None, since: float | None, until: float | None, checkpoint: str | None
) -> None:
    """Check the hash chain(s); name the first broken row and exit 1 if there is one.

    Streams the rows (memory stays flat) and shows progress on stderr: a bar on a terminal,
    else a line at most every 10 s.
    """
    if against and (since is not None or until is not None or checkpoint):
        raise click.UsageError("--against checks the whole chain: leave out --since, --until and --checkpoint")
    saved = _read_checkpoint(checkpoint)
    conn = _open(db)
    results, failed = [], False
    try:
        chains = _chains(conn, only)
        for instance in chains:
            result, problem = _verify_one(conn, instance, since, until, saved.get(instance), checkpoint, saved)
            if problem:
                failed = True
                click.echo(problem)
            else:
                results.append(result)
    finally:
        conn.close()
    for result in results:
        check = result.check
        who = (
            f"instance {result.instance_id}" + (f" ({result.name})" if result.name else "") + ": "
            if result.instance_id
            else ""
        )
        if check.ok:
            click.echo(f"OK: {who}{check.rows} rows, hash chain intact from {result.start}")
        else:
            failed = True
            click.echo(
                f"BROKEN: {who}at row id={check.broken_id} exchange_id={check.broken_exchange_id}: {check.reason} "
                f"({check.rows} rows before it verified, from {result.start})"
            )
    if not results and not failed:
        click.echo("OK: no rows yet")
    if against:
        failed = not _check_heads(db, against, results) or failed
    if failed:
        click.get_current_context().exit(1)


class _Result(NamedTuple):
    instance_id: str | None
    name: str | None
    check: Any  # a ChainCheck
    pruned: int
    head: str
    start: str = "genesis"  # where the walk started, in words


#: Seconds between two progress lines when stderr is no terminal.
PROGRESS_SECONDS = 10.0


def _chains(conn: Any, only: str | None) -> list[str | None]:
    """The chains to check: SQLite's one (None), or PostgreSQL's instances."""
    if isinstance(conn, sqlite3.Connection):
        return [None]
    from llmtap.audit import postgres

    return postgres.instances(conn) if only is None else [only]


def _scalar(conn: Any, instance: str | None, sql: str, params: Sequence[Any] = ()) -> Any:
    """One value of ``sql`` over one chain's rows (``{scope}`` in it: its WHERE term)."""
    if instance is None:
        return conn.execute(sql.format(scope="1 = 1"), params).fetchone()[0]
    return conn.execute(sql.format(scope="instance_id = %s").replace("?", "%s"), [instance, *params]).fetchone()[0]


def _verify_one(
    conn: Any,
    instance: str | None,
    since: float | None,
    until: float | None,
    resume: dict[str, Any] | None,
    checkpoint: str | None,
    saved: dict[str | None, dict[str, Any]],
) -> tuple[_Result | None, str | None]:
    """Verify one chain (all of it, a time range, or from a checkpoint); the result, or why not."""
    from llmtap.audit import rows as chain

    postgres = instance is not None
    if postgres:
        from llmtap.audit.postgres import chain_start

        pruned, anchor = chain_start(conn, instance)
    else:
        from llmtap.audit.sqlite import chain_anchor

        pruned = conn.execute("SELECT coalesce(sum(rows), 0) FROM pruned").fetchone()[0]
        anchor = chain_anchor(conn)
    label = f"instance {instance}" if postgres else "the chain"
    first_id, last_id, position = 0, 2**63 - 1, pruned  # position: rows of the chain before the walk
    start = "genesis" if anchor == chain.GENESIS else f"retention anchor {anchor}"
    if resume is not None and int(resume["id"]) >= (
        _scalar(conn, instance, "SELECT min(id) FROM exchanges WHERE {scope}") or 0
    ):
        stored = _links(conn, instance, int(resume["id"]), int(resume["id"]))
        if not stored or chain.as_hex(stored[0].row_hash) != resume["head"] or _edited(stored[0]):
            return None, (
                f"BROKEN: {label}: the checkpoint's row id={resume['id']} no longer holds {resume['head']} "
                "(it was edited or removed)"
            )
        first_id, anchor, position = int(resume["id"]) + 1, resume["head"], resume.get("rows")
        start = f"the checkpoint at row id={resume['id']}"
    if since is not None:
        found = _scalar(conn, instance, "SELECT min(id) FROM exchanges WHERE {scope} AND request_start >= ?", [since])
        if found is None:  # nothing recorded since then: nothing to check
            first_id, position, start = 2**63 - 1, None, "the range (it holds no rows)"
        elif found > first_id:
            first_id, position = found, None
            anchor = chain.as_hex(_links(conn, instance, found, found)[0].prev_hash)
            start = f"row id={found}'s prev_hash (the range's first row)"
    if until is not None:
        last_id = _scalar(conn, instance, "SELECT max(id) FROM exchanges WHERE {scope} AND request_start < ?", [until])
        last_id = -1 if last_id is None else last_id
    total = _scalar(
        conn, instance, "SELECT count(*) FROM exchanges WHERE {scope} AND id BETWEEN ? AND ?", [first_id, last_id]
    )
    seen: dict[str, Any] = {}
    with _Progress(total, label) as progress:

        def tick(check: Any) -> None:
            progress.update(check.rows)
            if checkpoint and position is not None and progress.checkpoint_due():
                _save_checkpoint(checkpoint, saved, instance, check, position)

        check = chain.walk_chain(_links(conn, instance, first_id, last_id, seen, stream=True), anchor, tick)
        progress.update(check.rows)
    if checkpoint and position is not None and check.last_id is not None:
        _save_checkpoint(checkpoint, saved, instance, check, position)
    return _Result(instance, seen.get("name"), check, pruned, check.head, start), None


def _links(
    conn: Any, instance: str | None, first_id: int, last_id: int, seen: dict | None = None, *, stream: bool = False
) -> Any:
    """A chain's rows from ``first_id`` to ``last_id`` as ``Link``s: streamed, or as a list."""
    if instance is None:
        from llmtap.audit.sqlite import chain_links

        links = chain_links(conn, first_id, last_id)
    else:
        from llmtap.audit.postgres import chain_links

        links = chain_links(conn, instance, first_id, last_id, seen)
    return links if stream else list(links)


def _edited(link: Any) -> bool:
    """Whether a row no longer hashes as stored (its own link only)."""
    from llmtap.audit.rows import as_digest, link_fault

    return link_fault(as_digest(link.prev_hash), link.prev_hash, link.row_hash, link.body) is not None


def _read_checkpoint(path: str | None) -> dict[str | None, dict[str, Any]]:
    """A checkpoint file's entries by chain (JSON lines: instance_id, id, head, rows)."""
    if not path or not os.path.exists(path):
        return {}
    entries = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                doc = json.loads(line)
                entries[doc.get("instance_id")] = doc
    return entries


def _save_checkpoint(
    path: str, saved: dict[str | None, dict[str, Any]], instance: str | None, check: Any, position: int
) -> None:
    """Save the last verified row of a chain (atomically: a crash leaves the old file whole)."""
    saved[instance] = {"instance_id": instance, "id": check.last_id, "head": check.head, "rows": position + check.rows}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(doc, sort_keys=True) + "\n" for doc in saved.values())
    os.replace(tmp, path)


class _Progress:
    """Verify's progress on stderr: rich's bar on a terminal, else a plain line at most every
    ``PROGRESS_SECONDS`` (and one at the start and the end)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self.started = self.shown = self.saved = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task(f"verifying {label}", total=total)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        else:
            click.echo(f"llmtap audit verify: {self.label}: {self.total:,} rows to check", err=True)
        return self

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
        elif now - self.shown >= PROGRESS_SECONDS:
            self.shown = now
            self._line("checked")

    def checkpoint_due(self) -> bool:
        now = time.monotonic()
        if now - self.saved < PROGRESS_SECONDS:
            return False
        self.saved = now
        return True

    def _line(self, verb: str) -> None:
        seconds = max(time.monotonic() - self.started, 1e-9)
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        click.echo(
            f"llmtap audit verify: {self.label}: {verb} {self.done:,} of {self.total:,} rows{share}, "
            f"{self.done / seconds:,.0f} rows/s",
            err=True,
        )

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
        else:
            self._line("done:")


def _check_heads(db: str, path: str, results: list[Any]) -> bool:
    """Every saved head must be a row of its (verified) chain at the position saved."""
    heads = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for line in lines:
        start = line.find("{")
        if start < 0:
            continue
        try:
            doc = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(doc, dict) and "head" in doc and "rows" in doc:
            heads.append(doc)
    if not heads:
        click.echo(f"BROKEN: no chain head found in {path}")
        return False
    conn = _open(db)
    ok = True
    try:
        for doc in heads:
            instance = doc.get("instance_id")
            result = next((r for r in results if r.instance_id == instance), None)
            label = f"instance {instance}" if instance else "the chain"
            if result is None:
                click.echo(f"BROKEN: {label} of the saved head {doc['head']} is not in the database")
                ok = False
                continue
            position = int(doc["rows"]) - result.pruned  # 1-based among the rows still stored
            found = None
            if position == 0 and result.check.anchor == doc["head"]:
                found = doc["head"]
            elif 0 < position <= result.check.rows:
                if is_server_url(db):
                    row = conn.execute(
                        "SELECT coalesce(row_digest, convert_to(row_hash, 'UTF8')), row_digest IS NULL FROM exchanges "
                        "WHERE instance_id = %s ORDER BY id OFFSET %s LIMIT 1",
                        (instance, position - 1),
                    ).fetchone()
                    row = row and (row[0].decode() if row[1] else row[0],)
                else:
                    row = conn.execute(
                        "SELECT row_hash FROM exchanges ORDER BY id LIMIT 1 OFFSET ?", (position - 1,)
                    ).fetchone()
                found = as_hex(row[0]) if row else None
            if found == doc["head"]:
                click.echo(f"OK: {label} still holds the saved head {doc['head']} as row {doc['rows']}")
            else:
                ok = False
                click.echo(
                    f"BROKEN: {label}: the saved head {doc['head']} (row {doc['rows']}) is not in the verified "
                    "chain: the chain was rewritten or cut"
                )
    finally:
        conn.close()
    return ok


@audit.command()
@click.option("--db", default="./llmtap.db", show_default=True, envvar="LLMTAP_DB", help=_DB_HELP)
def head(db: str) -> None:
    """Print each chain's head (JSON lines) to keep somewhere the database's administrators cannot write."""
    conn = _open(db)
    try:
        if is_server_url(db):
            from llmtap.audit import postgres

            docs = []
            for instance in postgres.instances(conn):
                hashed, rows = postgres.chain_head(conn, instance)
                docs.append({"instance_id": instance, "rows": rows, "head": hashed})
        else:
            last = conn.execute("SELECT row_hash FROM exchanges ORDER BY id DESC LIMIT 1").fetchone()
            rows = conn.execute("SELECT (SELECT count(*) FROM exchanges) + (SELECT coalesce(sum(rows), 0) FROM pruned)")
            docs = [
                {
                    "instance_id": None,
                    "rows": rows.fetchone()[0],
                    "head": as_hex(last[0]) if last else chain_anchor(conn),
                }
            ]
    finally:
        conn.close()
    for doc in docs:
        click.echo(json.dumps(doc, sort_keys=True))


@audit.command()
@click.option("--db", required=True, envvar="LLMTAP_DB", help="The PostgreSQL URL to migrate (an owner role).")
@click.option(
    "--grant",
    multiple=True,
    metavar="ROLE",
    help="Give ROLE what a sidecar needs (SELECT, INSERT; UPDATE on rollups). Repeatable.",
)
def migrate(db: str, grant: tuple[str, ...]) -> None:
    """Create or upgrade the PostgreSQL audit schema (numbered, transactional, under an advisory lock)."""
    if not is_server_url(db):
        raise click.UsageError("--db must be a PostgreSQL URL (SQLite migrates itself on open)")
    from llmtap.audit import postgres

    try:
        conn = postgres.connect(db)
        try:
            applied = postgres.migrate(conn, grant)
        finally:
            conn.close()
    except Exception as exc:
        raise click.ClickException(f"{redact_url(db)}: {exc}") from exc
    done = f"applied migration(s) {', '.join(map(str, applied))}" if applied else "schema already current"
    click.echo(f"{redact_url(db)}: {done}" + (f"; granted to {', '.join(grant)}" if grant else ""))


@audit.command(name="import")
@click.option(
    "--from", "source", required=True, type=click.Path(exists=True, dir_okay=False), help="A SQLite audit log."
)
@click.option("--db", required=True, envvar="LLMTAP_DB", help="The PostgreSQL URL to copy it into.")
@click.option("--instance-id", default=None, help="The chain's instance id (default: a new import-... id).")
def import_(source: str, db: str, instance_id: str | None) -> None:
    """Copy a SQLite audit history into PostgreSQL as one chain, hashes intact (verify passes)."""
    if not is_server_url(db):
        raise click.UsageError("--db must be a PostgreSQL URL")
    from llmtap.audit import postgres

    try:
        instance, copied = postgres.import_sqlite(source, db, instance_id)
    except Exception as exc:
        raise click.ClickException(f"{redact_url(db)}: {exc}") from exc
    click.echo(f"imported {copied} rows from {source} into {redact_url(db)} as instance {instance}")
