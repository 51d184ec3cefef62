"""``llmtap prices``: which price llmtap would use for a model, from which source, with the rates."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import click

from llmtap.audit.report import When

_RATE_FIELDS = {
    "input": "input_mtok",
    "output": "output_mtok",
    "cache_read": "cache_read_mtok",
    "cache_write": "cache_write_mtok",
}


def _rate(value: Any) -> Any:
    """A Decimal as its exact text; tiered prices as base and tiers."""
    if value is None:
        return None
    if isinstance(value, Decimal):
        return str(value)
    return {"base": str(value.base), "tiers": [{"start": t.start, "price": str(t.price)} for t in value.tiers]}


def _periods(quote: Any) -> list[dict[str, Any]] | None:
    """A database model's dated or time-of-day prices, oldest first (None when it has one price)."""
    if quote.database is None or not isinstance(quote.database.model.prices, list):
        return None
    periods = []
    for conditional in quote.database.model.prices:
        constraint = conditional.constraint
        when: dict[str, Any] = {}
        if constraint is not None and hasattr(constraint, "start_date"):
            when["from"] = constraint.start_date.isoformat()
        elif constraint is not None:
            when["daily"] = f"{constraint.start_time.isoformat()}-{constraint.end_time.isoformat()}"
        periods.append({**when, **{k: _rate(getattr(conditional.prices, f)) for k, f in _RATE_FIELDS.items()}})
    return periods


def describe(pricer: Any, model: str, provider: str | None, at: float, service_tier: str | None) -> dict[str, Any]:
    """What ``llmtap prices MODEL`` shows, as a plain dict."""
    when = datetime.fromtimestamp(at, UTC)
    quote = pricer.quote((model,), provider, when, service_tier)
    out: dict[str, Any] = {
        "model": model,
        "provider": provider,
        "at": when.isoformat(),
        "service_tier": service_tier,
    }
    if quote is None:
        return {**out, "source": "unknown", "price_version": pricer.version}
    rates = {k: _rate(getattr(quote.price, f)) for k, f in _RATE_FIELDS.items()}
    if quote.one_hour_rate is not None:
        rates["cache_write_1h"] = _rate(quote.one_hour_rate)
    elif quote.price.cache_write_mtok is not None and quote.price.input_mtok is not None:
        rates["cache_write_1h"] = "2 × input (Anthropic's rule; the source has no 1-hour rate)"
    out.update(
        source=quote.source,
        price_model=quote.model_id,
        price_version=quote.version,
        usd_per_million_tokens=rates,
    )
    if quote.user is not None:
        entry = quote.user
        out["valid_from"] = entry.valid_from.isoformat() if entry.valid_from else None
        out["valid_to"] = entry.valid_to.isoformat() if entry.valid_to else None
    if (periods := _periods(quote)) is not None:
        out["periods"] = periods
    return out


@click.command()
@click.argument("model", required=False)
@click.option("--provider", help="The provider serving it (openai, anthropic, google, ...): scopes the match.")
@click.option("--at", type=When(), help="Price in force at this moment (ISO date/time, UTC; or 7d ago); default now.")
@click.option("--service-tier", help="OpenAI service tier (flex, priority, ...); default the standard tier.")
@click.option(
    "--prices", "prices_file", default="", help="Your own prices file (YAML or JSON), as given to llmtap run."
)
@click.option("--price-data", default="", help="A genai-prices data file instead of the bundled data.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def prices(
    model: str | None,
    provider: str | None,
    at: float | None,
    service_tier: str | None,
    prices_file: str,
    price_data: str,
    as_json: bool,
) -> None:
    """Which price llmtap would use for MODEL, from which source, with its rates (USD per million
    tokens) and the price data's version. Without MODEL: the price data's version."""
    from llmtap.audit.report import _pricer

    pricer = _pricer(prices_file, price_data)
    if model is None:
        info = pricer.database.describe()
        if pricer.user is not None:
            info["user_prices"] = {"path": pricer.user.path, "version": pricer.user.version, "models": len(pricer.user)}
        if as_json:
            click.echo(json.dumps(info, indent=2))
        else:
            click.echo(f"price data: {info['description']}")
            click.echo(f"version:    {info['version']} ({info['providers']} providers, {info['models']} models)")
            if info["latest_price_start"]:
                click.echo(f"date:       prices known to {info['latest_price_start']} (its latest dated price change)")
            if "user_prices" in info:
                user = info["user_prices"]
                click.echo(f"overrides:  {user['path']} ({user['version']}, {user['models']} models)")
        return
    out = describe(pricer, model, provider, time.time() if at is None else at, service_tier)
    if as_json:
        click.echo(json.dumps(out, indent=2))
    elif out["source"] == "unknown":
        click.echo(
            f"{model}: unknown (no price in any source; {out['price_version']}). Its cost will be recorded as unknown."
        )
    else:
        click.echo(f"{model} at {out['at']}: {out['source']} price {out['price_model']} ({out['price_version']})")
        for name, rate in out["usd_per_million_tokens"].items():
            if rate is None:
                continue
            if isinstance(rate, dict):
                tiers = ", ".join(f"{t['price']} above {t['start']:,} input tokens" for t in rate["tiers"])
                rate = f"{rate['base']} ({tiers})"
            click.echo(f"  {name:<15} {rate}{_unit(rate)}")
        for period in out.get("periods") or ():
            start = period.get("from") or (f"daily {period['daily']}" if "daily" in period else "initially")
            click.echo(f"  period {start}: input {_flat(period['input'])}, output {_flat(period['output'])}")
    if out["source"] == "unknown":
        click.get_current_context().exit(1)


def _unit(rate: str) -> str:
    """A number (or tiered numbers) takes the unit; a rule in words reads as it is."""
    return "" if rate.startswith("2 × input") else " USD / 1M tokens"


def _flat(rate: Any) -> str:
    return rate["base"] + " (+tiers)" if isinstance(rate, dict) else str(rate)
