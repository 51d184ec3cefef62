"""What an exchange cost: right, or honestly unknown, and where the price came from.

Sources, first that answers wins, recorded on every record as ``cost_source``:

``reported``  the upstream said so (Pulze ``metadata.costs``, OpenRouter ``usage.cost``),
              carried by the parsers as ``reported_cost_usd``.
``user``      the ``--prices`` file (see ``llmtap.pricing.user``).
``database``  pydantic's genai-prices data (see ``llmtap.pricing.database``).
``unknown``   none of them: ``cost_usd`` is None (never a silent $0). Also when the tokens are
              not known (a stream without usage), or the exchange ran on a service tier
              (flex, priority, ...) that the source has no price for.

Rows written before this scheme say ``computed``: priced by llmtap's former built-in table.

Numbers are checked first (``llmtap.pricing.validity``): a negative, non-finite or absurd token
count or amount is not spend. It becomes None, with a note in the record's ``anomalies``; a
bad reported cost makes the cost ``unknown`` (not priced from tokens: an upstream that reports
nonsense is not trusted for the rest either), and so does a priced cost above the ceiling.

Money is exact: prices are ``Decimal`` USD per million tokens, the cost is computed in
``Decimal`` and rounded half-even to the nano-dollar once, per exchange. ``cost_nanousd`` holds
it as an integer (sums in SQL are exact); ``cost_usd`` is the same amount as the nearest float
(``nano / 1e9``, whose ``repr`` is the decimal itself: no float noise in JSON). A reported cost
is kept in ``cost_usd`` exactly as the upstream sent it; its ``cost_nanousd`` is rounded.

Token conventions (``llmtap.record``): ``input_tokens`` counts every input token, cache reads
(``cached_input_tokens``) and cache writes (``cache_write_input_tokens``) included;
``output_tokens`` already includes reasoning tokens, which are never added on top. Prices are
those in force at the exchange's ``request_start`` (UTC): dated prices, time-of-day prices and
long-context tiers are the database's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from genai_prices.types import ModelPrice, TieredPrices, Usage, calc_mtok_price

from llmtap.config import Settings
from llmtap.pricing.database import DatabaseMatch, PriceDatabase
from llmtap.pricing.user import PricesFileError, UserPrice, UserPrices, normalise_tier
from llmtap.pricing.validity import DEFAULT_CEILINGS, Ceilings, amount_problem, check_fields, note

__all__ = ("CostParts", "Pricer", "PricesFileError", "resolve_cost", "to_nano")

_ZERO = Decimal(0)
_TWO = Decimal(2)
#: Anthropic's published rule: a 1-hour cache write costs twice the base input price (the
#: 5-minute write, genai-prices' ``cache_write_mtok``, costs 1.25×). Used when the source has
#: no 1-hour rate of its own; only Anthropic reports the split.
ONE_HOUR_WRITE_MULTIPLIER = _TWO


def to_nano(amount: Decimal) -> int:
    """USD to integer nano-dollars, rounded half-even (``round`` of a Decimal always is)."""
    return round(amount.scaleb(9))


def usd(nano: int | None) -> float | None:
    """Integer nano-dollars as the nearest float (its ``repr`` is the exact decimal)."""
    return None if nano is None else nano / 1e9


@dataclass(frozen=True, slots=True)
class CostParts:
    """A priced exchange: input (prompt, cache reads and writes) and output, in USD."""

    input: Decimal
    output: Decimal

    @property
    def total(self) -> Decimal:
        return self.input + self.output


def price_usage(
    price: ModelPrice, usage: Usage, one_hour: int, one_hour_rate: Decimal | TieredPrices | None
) -> CostParts:
    """genai-prices' own arithmetic (``ModelPrice.calc_price``: tiers by total input tokens,
    cache reads and writes at their rates, the rest of the input at the input rate), plus the
    1-hour part of the cache writes at its own rate."""
    if one_hour and price.cache_write_mtok is not None and price.input_mtok is not None:
        # the 1-hour tokens leave the cache-write bucket (priced as plain input by calc_price),
        # then get the difference between their rate and the input rate
        usage = Usage(
            input_tokens=usage.input_tokens,
            cache_write_tokens=(usage.cache_write_tokens or 0) - one_hour,
            cache_read_tokens=usage.cache_read_tokens,
            output_tokens=usage.output_tokens,
        )
        total_input = usage.input_tokens or 0
        input_cost = calc_mtok_price(price.input_mtok, one_hour, total_input)
        if one_hour_rate is None:
            extra = input_cost * (ONE_HOUR_WRITE_MULTIPLIER - 1)
        else:
            extra = calc_mtok_price(one_hour_rate, one_hour, total_input) - input_cost
    else:
        extra = _ZERO
    calc = price.calc_price(usage)
    return CostParts(calc["input_price"] + extra, calc["output_price"])


@dataclass(frozen=True, slots=True)
class Quote:
    """Which price applies to an exchange: from where, which entry, and the rates."""

    source: str  # user | database
    version: str
    model_id: str
    price: ModelPrice
    one_hour_rate: Decimal | TieredPrices | None
    user: UserPrice | None = None
    database: DatabaseMatch | None = None


class Pricer:
    """The user's prices over the database; every lookup cached."""

    def __init__(self, database: PriceDatabase, user: UserPrices | None = None) -> None:
        self.database = database
        self.user = user
        # quotes that cannot change with time (no dated price, no dated user entry), by lookup key
        self._fixed: dict[tuple[tuple[str | None, ...], str | None, str | None], Quote | None] = {}

    @property
    def version(self) -> str:
        """Every source this pricer reads: ``user:<sha256>+genai-prices:0.0.61``."""
        return self.database.version if self.user is None else f"{self.user.version}+{self.database.version}"

    @classmethod
    def load(cls, prices: str | None = None, price_data: str | None = None) -> Pricer:
        """Raises ``PricesFileError`` (user file) or ``ValueError``/``OSError`` (data file)."""
        database = PriceDatabase.from_file(price_data) if price_data else PriceDatabase.bundled()
        return cls(database, UserPrices.load(prices) if prices else None)

    def quote(
        self,
        names: tuple[str | None, ...],
        provider: str | None,
        when: datetime,
        service_tier: str | None = None,
    ) -> Quote | None:
        """The price of the first name a source knows, user file first; None when none does.

        A non-standard service tier (flex, priority, ...) is priced only by a user entry for
        that tier: genai-prices 0.0.61's data has no service tiers.
        """
        tier = normalise_tier(service_tier)
        key = (names, provider, tier)
        try:
            return self._fixed[key]
        except KeyError:
            pass
        quote = self._quote(names, provider, when, tier)
        if self._time_independent(quote, names):
            if len(self._fixed) >= 4096:
                self._fixed.clear()
            self._fixed[key] = quote
        return quote

    def _time_independent(self, quote: Quote | None, names: tuple[str | None, ...]) -> bool:
        if self.user is not None and self.user.dated(names):
            return False  # which user entry applies depends on the time
        return quote is None or quote.user is not None or isinstance(quote.database.model.prices, ModelPrice)

    def _quote(
        self, names: tuple[str | None, ...], provider: str | None, when: datetime, tier: str | None
    ) -> Quote | None:
        if self.user is not None:
            entry = self.user.match(names, provider, when, tier)
            if entry is not None:
                return Quote("user", self.user.version, entry.model, entry.price, entry.cache_write_1h, user=entry)
        if tier is not None:
            return None
        for name in names:
            if not name:
                continue
            found = None
            if "/" in name:  # "openai/gpt-4o": a prefix the database knows names the provider
                prefix, bare = name.split("/", 1)
                if self.database.provider(prefix) is not None:
                    found = self.database.match(prefix, bare)
            if found is None:
                found = self.database.match(provider, name)
            if found is not None:
                return Quote(
                    "database", self.database.version, found.model_id, found.prices_at(when), None, database=found
                )
        return None

    def price(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """``cost_*`` and provenance fields for a record being built from ``fields``."""
        reported = fields.get("reported_cost_usd")
        if reported is not None:
            try:
                nano = to_nano(Decimal(repr(float(reported))))
            except (ValueError, ArithmeticError, TypeError):
                nano = None
            if nano is not None and nano >= 0:
                # cost_usd keeps the amount as sent (a router may send sub-nano digits, or float
                # noise of its own); cost_nanousd is it to the nano-dollar, what sums use
                return {"cost_usd": float(reported), "cost_nanousd": nano, "cost_source": "reported"}
        input_tokens, output_tokens = fields.get("input_tokens"), fields.get("output_tokens")
        if input_tokens is None or output_tokens is None:
            return _UNKNOWN
        served = (fields.get("served_namespace"), fields.get("response_model"))
        names = served if any(served) else (fields.get("request_model"),)
        when = datetime.fromtimestamp(fields.get("request_start") or 0.0, UTC)
        quote = self.quote(names, fields.get("provider"), when, fields.get("service_tier"))
        if quote is None:  # consulted and not found: the version says which data said so
            return {**_UNKNOWN, "price_version": self.database.version}
        cached = min(fields.get("cached_input_tokens") or 0, input_tokens)
        writes = min(fields.get("cache_write_input_tokens") or 0, input_tokens - cached)
        one_hour = min(fields.get("cache_write_1h_input_tokens") or 0, writes)
        usage = Usage(
            input_tokens=input_tokens, cache_read_tokens=cached, cache_write_tokens=writes, output_tokens=output_tokens
        )
        try:
            parts = price_usage(quote.price, usage, one_hour, quote.one_hour_rate)
        except (ValueError, ArithmeticError):  # inconsistent counts: no number rather than a wrong one
            return {**_UNKNOWN, "price_model": quote.model_id, "price_version": quote.version}
        prompt, completion = to_nano(parts.input), to_nano(parts.output)
        nano = to_nano(parts.total)
        return {
            "cost_usd": usd(nano),
            "cost_nanousd": nano,
            "cost_prompt_usd": usd(prompt),
            "cost_completion_usd": usd(completion),
            "cost_source": quote.source,
            "price_version": quote.version,
            "price_model": quote.model_id,
        }


_UNKNOWN: dict[str, Any] = {"cost_usd": None, "cost_nanousd": None, "cost_source": "unknown"}


def ceilings_of(settings: Settings | None) -> Ceilings:
    if settings is None:
        return DEFAULT_CEILINGS
    return Ceilings(settings.token_ceiling, float(settings.cost_ceiling_usd))


def resolve_cost(fields: Mapping[str, Any], prices: Pricer, settings: Settings | None = None) -> dict[str, Any]:
    """``cost_usd``/``cost_source`` (and parts, provenance) from parsed fields, the numbers
    checked first: when one is bad, the result also holds it set to None, and ``anomalies``."""
    ceilings = ceilings_of(settings)
    changes, notes = check_fields(fields, ceilings)
    if fields.get("anomalies"):
        notes = {**fields["anomalies"], **notes}
    checked = {**fields, **changes} if changes else fields
    if "reported_cost_usd" in notes:  # the upstream reported a cost, and it is not one
        cost = dict(_UNKNOWN)
    else:
        cost = prices.price(checked)
    if cost.get("cost_usd") is not None and (problem := amount_problem(cost["cost_usd"], ceilings)):
        notes["cost_usd"] = note(cost["cost_usd"], f"{cost['cost_source']} cost {problem}")
        cost = {**cost, **_UNKNOWN, "cost_prompt_usd": None, "cost_completion_usd": None}
    return {**changes, **cost, "anomalies": notes} if notes else cost
