"""What an exchange cost: reported beats computed beats unknown, and never a silent $0.

``reported``: the upstream said so (Pulze ``metadata.costs``, in USD).
``computed``: token counts times a known price (built-in table, overridable by ``--prices``).
``unknown``: neither; ``cost_usd`` stays None so no sum can mistake it for free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens. Cached input falls back to the input price (never cheaper).

    Cache writes (``cache_write_input_tokens``, of which ``cache_write_1h_input_tokens`` kept an
    hour) cost ``cache_write`` / ``cache_write_1h`` where a provider charges more for them
    (Anthropic: 1.25× and 2× the input price); else the input price.
    """

    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None
    cache_write_1h: float | None = None


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
    "o4-mini": Price(1.10, 4.40, 0.275),
    "text-embedding-3-small": Price(0.02, 0.0),
    "text-embedding-3-large": Price(0.13, 0.0),
    "text-embedding-ada-002": Price(0.10, 0.0),
    "claude-3-haiku": Price(0.25, 1.25),
    "claude-3-5-haiku": Price(0.80, 4.00),
    "claude-3-5-sonnet": Price(3.00, 15.00),
    "claude-3-opus": Price(15.00, 75.00),
    "claude-haiku-4-5": Price(1.00, 5.00, 0.10, 1.25, 2.00),
    "claude-sonnet-4-5": Price(3.00, 15.00, 0.30, 3.75, 6.00),
    "claude-opus-4-1": Price(15.00, 75.00, 1.50, 18.75, 30.00),
    "gemini-2.5-pro": Price(1.25, 10.00, 0.125),  # prompts up to 200k tokens
    "gemini-2.5-flash": Price(0.30, 2.50, 0.03),
    "gemini-2.5-flash-lite": Price(0.10, 0.40, 0.01),
    "gemini-2.0-flash": Price(0.10, 0.40, 0.025),
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
                    *(
                        None if spec.get(k) is None else float(spec[k])
                        for k in ("cached_input", "cache_write", "cache_write_1h")
                    ),
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


def resolve_cost(fields: Mapping[str, Any], prices: PriceTable) -> dict[str, Any]:
    """``cost_usd``/``cost_source`` (and computed parts) from parsed fields."""
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
    written = min(fields.get("cache_write_input_tokens") or 0, input_tokens - cached)
    written_1h = min(fields.get("cache_write_1h_input_tokens") or 0, written)
    cached_rate = price.input if price.cached_input is None else price.cached_input
    write_rate = price.input if price.cache_write is None else price.cache_write
    write_1h_rate = write_rate if price.cache_write_1h is None else price.cache_write_1h
    plain = input_tokens - cached - written
    prompt = (
        plain * price.input + cached * cached_rate + (written - written_1h) * write_rate + written_1h * write_1h_rate
    ) / 1e6
    completion = output_tokens * price.output / 1e6
    return {
        "cost_usd": prompt + completion,
        "cost_prompt_usd": prompt,
        "cost_completion_usd": completion,
        "cost_source": "computed",
    }
