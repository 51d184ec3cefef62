"""What an exchange cost: reported beats computed beats unknown, and never a silent $0.

``reported``: the upstream said so (Pulze ``metadata.costs``, in USD).
``computed``: token counts times a known price (built-in table, overridable by ``--prices``).
``unknown``: neither; ``cost_usd`` stays None so no sum can mistake it for free.

Numbers are checked first (``llmtap.pricing.validity``): a negative, non-finite or absurd token
count or amount is not spend. It becomes None, with a note in the record's ``anomalies``; a
bad reported cost makes the cost ``unknown`` (not computed from tokens: an upstream that
reports nonsense is not trusted for the rest either), and so does a computed cost above the
ceiling.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtap.config import Settings
from llmtap.pricing.validity import DEFAULT_CEILINGS, Ceilings, amount_problem, check_fields, note


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens. Cached input falls back to the input price (never cheaper)."""

    input: float
    output: float
    cached_input: float | None = None


#: List prices in USD per 1M tokens, as published by each provider in 2024-2025. They change:
#: override or extend them with ``--prices FILE`` (``{"model": {"input": x, "output": y}}``).
BUILTIN_PRICES: dict[str, Price] = {
    "gpt-4o": Price(2.50, 10.00, 1.25),
    "gpt-4o-mini": Price(0.15, 0.60, 0.075),
    "gpt-4-turbo": Price(10.00, 30.00),
    "gpt-4": Price(30.00, 60.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "gpt-3.5-turbo-instruct": Price(1.50, 2.00),
    "gpt-4.1": Price(2.00, 8.00, 0.50),
    "gpt-4.1-mini": Price(0.40, 1.60, 0.10),
    "o1": Price(15.00, 60.00, 7.50),
    "o3-mini": Price(1.10, 4.40, 0.55),
    "claude-3-haiku": Price(0.25, 1.25),
    "claude-3-5-haiku": Price(0.80, 4.00),
    "claude-3-5-sonnet": Price(3.00, 15.00),
    "claude-3-opus": Price(15.00, 75.00),
    "mistral-small": Price(0.20, 0.60),
    "mistral-large": Price(2.00, 6.00),
    "llama-3-8b-instruct": Price(0.05, 0.25),
    "llama-3-70b-instruct": Price(0.59, 0.79),
}


class PriceTable:
    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices = {k.lower(): v for k, v in prices.items()}
        # longest first, so "gpt-4o-mini-2024-07-18" matches gpt-4o-mini, not gpt-4o
        self._prefixes = sorted(self._prices, key=len, reverse=True)

    @classmethod
    def load(cls, path: str | None = None) -> PriceTable:
        """The built-in table, with a user's JSON file merged over it."""
        prices = dict(BUILTIN_PRICES)
        if path:
            raw = json.loads(Path(path).read_text())
            for model, spec in raw.items():
                prices[model] = Price(
                    float(spec["input"]),
                    float(spec["output"]),
                    None if spec.get("cached_input") is None else float(spec["cached_input"]),
                )
        return cls(prices)

    def lookup(self, *names: str | None) -> Price | None:
        """The first model name that has a price: exact, then without ``provider/``, then by prefix."""
        for name in names:
            if not name:
                continue
            name = name.lower()
            bare = name.rsplit("/", 1)[-1]
            for candidate in (name, bare):
                if candidate in self._prices:
                    return self._prices[candidate]
            for prefix in self._prefixes:
                if bare.startswith(prefix + "-"):
                    return self._prices[prefix]
        return None


def ceilings_of(settings: Settings | None) -> Ceilings:
    if settings is None:
        return DEFAULT_CEILINGS
    return Ceilings(settings.token_ceiling, float(settings.cost_ceiling_usd))


def resolve_cost(fields: Mapping[str, Any], prices: PriceTable, settings: Settings | None = None) -> dict[str, Any]:
    """``cost_usd``/``cost_source`` (and computed parts) from parsed fields, with the numbers
    checked: when one is bad, the result also holds it set to None, and ``anomalies``."""
    ceilings = ceilings_of(settings)
    changes, notes = check_fields(fields, ceilings)
    if fields.get("anomalies"):
        notes = {**fields["anomalies"], **notes}
    checked = {**fields, **changes} if changes else fields
    cost = _cost(checked, prices, notes)
    if cost["cost_usd"] is not None and (problem := amount_problem(cost["cost_usd"], ceilings)):
        notes["cost_usd"] = note(cost["cost_usd"], f"{cost['cost_source']} cost {problem}")
        cost = {"cost_usd": None, "cost_prompt_usd": None, "cost_completion_usd": None, "cost_source": "unknown"}
    return {**changes, **cost, "anomalies": notes} if notes else cost


def _cost(fields: Mapping[str, Any], prices: PriceTable, notes: Mapping[str, str]) -> dict[str, Any]:
    if "reported_cost_usd" in notes:  # the upstream reported a cost, and it is not one
        return {"cost_usd": None, "cost_source": "unknown"}
    reported = fields.get("reported_cost_usd")
    if reported is not None:
        return {"cost_usd": reported, "cost_source": "reported"}
    input_tokens, output_tokens = fields.get("input_tokens"), fields.get("output_tokens")
    if input_tokens is None or output_tokens is None:
        return {"cost_usd": None, "cost_source": "unknown"}
    price = prices.lookup(fields.get("served_namespace"), fields.get("response_model"), fields.get("request_model"))
    if price is None:
        return {"cost_usd": None, "cost_source": "unknown"}
    cached = min(fields.get("cached_input_tokens") or 0, input_tokens)
    cached_rate = price.input if price.cached_input is None else price.cached_input
    prompt = ((input_tokens - cached) * price.input + cached * cached_rate) / 1e6
    completion = output_tokens * price.output / 1e6
    return {
        "cost_usd": prompt + completion,
        "cost_prompt_usd": prompt,
        "cost_completion_usd": completion,
        "cost_source": "computed",
    }
