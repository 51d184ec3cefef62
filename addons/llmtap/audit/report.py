"""``llmtap report`` and ``llmtap audit verify``: read the audit log, also while the proxy writes.

Both open the database read-only; in WAL mode the proxy's writer is never blocked by them.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sqlite3
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple

import click

from llmtap.audit.store import GENESIS, connect_readonly, verify_chain

#: ``--by`` dimensions and the SQL expression each groups by (times are UTC).
DIMENSIONS = {
    "model": "coalesce(response_model, request_model)",
    "provider": "provider",
    "app": "app_id",
    "key": "key_fingerprint",
    "day": "strftime('%Y-%m-%d', request_start, 'unixepoch')",
    "hour": "strftime('%Y-%m-%dT%H:00Z', request_start, 'unixepoch')",
    "status": "coalesce(CAST(http_status AS TEXT), error_type)",
    "family": "family",
    # rows written before record schemas were numbered carry none: they are schema 1
    "schema": "coalesce(record_schema, 1)",
}
METRICS = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "cost_savings_usd",
    "p50_s",
    "p95_s",
    "unknown_cost",
)
_SUMS = """count(*) AS requests,
    sum(error_type IS NOT NULL) AS errors,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cost_usd) AS cost_usd,
    sum(cost_savings_usd) AS cost_savings_usd,
    sum(cost_usd IS NULL AND coalesce(cost_source, '') != 'deferred') AS unknown_cost"""
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


def grouping(by: Sequence[str]) -> Grouping:
    names, exprs, params = [], [], []
    for dimension in by:
        if dimension.startswith("label:") and len(dimension) > 6 and '"' not in dimension:
            exprs.append("json_extract(labels, ?)")
            params.append(f'$."{dimension[6:]}"')
        elif dimension in DIMENSIONS:
            exprs.append(DIMENSIONS[dimension])
        else:
            raise click.BadParameter(
                f"{dimension!r}: use one of {', '.join(DIMENSIONS)} or label:NAME", param_hint="--by"
            )
        names.append(dimension)
    return Grouping(names, exprs, params)


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (a value that really occurred), None for no values."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(p * len(sorted_values)) - 1)]


def _columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute("PRAGMA table_info(exchanges)")}


def _nano(amount: Decimal | None) -> int | None:
    return None if amount is None else round(amount.scaleb(9))


def spend(
    conn: sqlite3.Connection,
    by: Sequence[str],
    since: float | None,
    until: float | None,
    reprice: Any = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows per group and the totals row, as plain dicts (group names first, then METRICS).

    Money is summed exactly: a row's ``cost_nanousd`` (integer nano-dollars) where it has one,
    else its float ``cost_usd`` as a decimal (rows of an older llmtap). Each row and the totals
    also carry ``cost_nanousd``, the sum in nano-dollars.

    ``reprice``: a ``llmtap.pricing.cost.Pricer``; each group then also has ``reprice_usd``
    (its rows' tokens priced by it, at each row's own time) and ``reprice_unknown``.
    """
    group = grouping(by)
    columns = _columns(conn)
    where, where_params = ["1"], []
    if since is not None:
        where.append("request_start >= ?")
        where_params.append(since)
    if until is not None:
        where.append("request_start < ?")
        where_params.append(until)
    where_sql = " AND ".join(where)
    keys = [f"g{i}" for i in range(len(group.exprs))]
    select = "".join(f"{expr} AS {key}, " for expr, key in zip(group.exprs, keys))
    order = f"GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}" if keys else ""
    sums = conn.execute(
        f"SELECT {select}{_SUMS} FROM exchanges WHERE {where_sql} {order}", [*group.params, *where_params]
    ).fetchall()
    totals = dict(conn.execute(f"SELECT {_SUMS} FROM exchanges WHERE {where_sql}", where_params).fetchone())
    latencies: dict[tuple, list[float]] = defaultdict(list)
    # money is summed here as decimals (SQLite's float sum adds noise such as 0.0008649999999999999)
    money: dict[tuple, dict[str, Decimal]] = defaultdict(dict)
    money_cols = ", ".join(MONEY) + (", cost_nanousd" if "cost_nanousd" in columns else ", NULL")
    for row in conn.execute(
        f"SELECT {select}duration_s, {money_cols} FROM exchanges WHERE {where_sql}", [*group.params, *where_params]
    ):
        values = tuple(row)
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
    totals.update(p50_s=percentile(everything, 0.5), p95_s=percentile(everything, 0.95))
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
                **{m: row[m] for m in METRICS if m in row.keys()},  # noqa: SIM118 (sqlite3.Row: `in` tests values)
                **{name: float(money[key][name]) if name in money[key] else None for name in MONEY},
                "cost_nanousd": _nano(money[key].get("cost_usd")),
                "p50_s": percentile(values, 0.5),
                "p95_s": percentile(values, 0.95),
            }
        )
    total_row = {
        **dict.fromkeys(group.names),
        **{m: totals[m] for m in METRICS},
        "cost_nanousd": totals["cost_nanousd"],
    }
    if reprice is not None:
        _reprice(conn, group, keys, select, where_sql, where_params, columns, reprice, rows, total_row)
    return rows, total_row


def _reprice(
    conn: sqlite3.Connection,
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
    for row in conn.execute(
        f"SELECT {select}{wanted} FROM exchanges WHERE {where_sql}", [*group.params, *where_params]
    ):
        values = tuple(row)
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


def unpriced(conn: sqlite3.Connection, since: float | None, until: float | None) -> list[dict[str, Any]]:
    """Successful exchanges whose cost is unknown, per model and provider, most first."""
    where, params = ["cost_usd IS NULL", "error_type IS NULL"], []
    if since is not None:
        where.append("request_start >= ?")
        params.append(since)
    if until is not None:
        where.append("request_start < ?")
        params.append(until)
    return [
        {"model": row[0], "provider": row[1], "requests": row[2]}
        for row in conn.execute(
            "SELECT coalesce(response_model, request_model), provider, count(*) FROM exchanges "
            f"WHERE {' AND '.join(where)} GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2",
            params,
        )
    ]


def _open(db: str) -> sqlite3.Connection:
    try:
        return connect_readonly(db)
    except (OSError, ValueError, sqlite3.Error) as exc:
        raise click.ClickException(str(exc)) from exc


@click.command()
@click.option("--db", default="./llmtap.db", show_default=True, help="The audit log to read.")
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
@click.option("--prices", "prices_file", default="", help="With --reprice: your own prices file (YAML or JSON).")
@click.option("--price-data", default="", help="With --reprice: a genai-prices data file instead of the bundled data.")
def report(
    db: str,
    since: float | None,
    until: float | None,
    by: tuple[str, ...],
    fmt: str,
    reprice: bool,
    prices_file: str,
    price_data: str,
) -> None:
    """Spend report from the audit log: requests, errors, tokens, USD and latency per group.

    A cost sum that leaves out exchanges of unknown cost says so (``0.12 + 3 unknown`` in the
    table; the ``unknown_cost`` column in every format). Money is summed as exact decimals.
    The models whose cost is unknown are listed (JSON: ``unpriced``).
    """
    group = grouping(by or (DEFAULT_BY,))  # validate before opening anything
    pricer = _pricer(prices_file, price_data) if reprice else None
    conn = _open(db)
    try:
        rows, totals = spend(conn, group.names, since, until, pricer)
        missing = unpriced(conn, since, until)
    finally:
        conn.close()
    metrics = [*METRICS, *REPRICE_METRICS] if reprice else list(METRICS)
    if not rows and fmt != "table":
        click.echo(f"llmtap report: no exchanges {_range(since, until)} in {db}", err=True)
    if fmt == "json":
        document = {"since": since, "until": until, "by": group.names, "rows": rows, "totals": totals}
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
        click.echo(f"No exchanges {_range(since, until)} in {db}.")
    else:
        _print_table(group.names, rows, totals, since, until, pricer.version if pricer else None)
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


def _decimal(value: float | int | str) -> Decimal:
    """A stored amount as a decimal: a float to 15 significant digits, which every float holds
    exactly, so that a computed 17 x 0.2 / 1e6 = 3.4000000000000003e-06 counts as 0.0000034."""
    return Decimal(value if isinstance(value, str) else format(value, ".15g"))


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
    reprice_version: str | None = None,
) -> None:
    from rich.console import Console
    from rich.table import Table

    def when(ts: float | None, default: str) -> str:
        return default if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")

    table = Table(
        title=f"llmtap spend by {', '.join(names)}, {when(since, 'start')} to {when(until, 'now')}",
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


@audit.command()
@click.option("--db", default="./llmtap.db", show_default=True, help="The audit log to check.")
def verify(db: str) -> None:
    """Check the hash chain; name the first broken row and exit 1 if there is one."""
    conn = _open(db)
    try:
        check = verify_chain(conn)
    finally:
        conn.close()
    start = "genesis" if check.anchor == GENESIS else f"retention anchor {check.anchor}"
    if check.ok:
        click.echo(f"OK: {check.rows} rows, hash chain intact from {start}")
        return
    click.echo(
        f"BROKEN at row id={check.broken_id} exchange_id={check.broken_exchange_id}: {check.reason} "
        f"({check.rows} rows before it verified, from {start})"
    )
    click.get_current_context().exit(1)
