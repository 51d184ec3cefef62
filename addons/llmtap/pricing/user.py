"""A user's own prices (``--prices FILE``, YAML or JSON): they override the database.

The file maps a model name to one price, or to a list of prices (per provider, per period,
per service tier)::

    gpt-4o:                       # the model name as the API reports it (case-insensitive)
      input: 2.50                 # USD per million tokens: required
      output: 10.00               # required
      cache_read: 1.25            # optional; without it cache reads cost the input price
      cache_write: 3.75           # optional; without it cache writes cost the input price
      cache_write_1h: 6.00        # optional (Anthropic 1-hour writes); else 2× input
    claude-sonnet-4-5:
      - provider: anthropic       # optional: only exchanges served by this provider
        valid_from: 2025-09-29    # optional, UTC date or date-time, inclusive
        valid_to: 2026-01-01      # optional, exclusive
        service_tier: priority    # optional: only exchanges on this tier
        input: 3
        output: 15
        tiers:                    # optional long-context tiers: above `start` input tokens,
          - start: 200000         # every token of the exchange costs the tier's rates
            input: 6
            output: 22.5

Names match exactly (after lower-casing; ``provider/model`` also matches ``model``); there is
no prefix matching. The old format's ``cached_input`` is read as ``cache_read``. A file that
does not parse, or an entry without ``input`` or ``output``, is refused at start with a message
naming the file, the model and the field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from genai_prices.types import ModelPrice, Tier, TieredPrices

_RATES = ("input", "output", "cache_read", "cache_write", "cache_write_1h")
_KEYS = frozenset({*_RATES, "provider", "valid_from", "valid_to", "service_tier", "tiers", "cached_input"})
_TO_MTOK = {
    "input": "input_mtok",
    "output": "output_mtok",
    "cache_read": "cache_read_mtok",
    "cache_write": "cache_write_mtok",
}


class PricesFileError(ValueError):
    """A ``--prices`` file llmtap refuses; the message names the file, the model and the field."""


@dataclass(frozen=True, slots=True)
class UserPrice:
    model: str  # the file's key, as written
    provider: str | None
    valid_from: datetime | None
    valid_to: datetime | None
    service_tier: str | None
    price: ModelPrice
    cache_write_1h: Decimal | TieredPrices | None
    rates: dict[str, Any]  # as given, for ``llmtap prices``

    def active(self, provider: str | None, when: datetime, service_tier: str | None) -> bool:
        if self.provider is not None and self.provider != (provider or "").lower():
            return False
        if self.service_tier != service_tier:
            return False
        if self.valid_from is not None and when < self.valid_from:
            return False
        return self.valid_to is None or when < self.valid_to


class UserPrices:
    """The parsed file: exact-name lookup, the most specific entry in force wins."""

    def __init__(self, entries: dict[str, list[UserPrice]], version: str, path: str) -> None:
        self._entries = entries
        self.version = version
        self.path = path

    @classmethod
    def load(cls, path: str) -> UserPrices:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise PricesFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        data = _parse(path, raw)
        if not isinstance(data, dict):
            raise PricesFileError(f"{path}: expected a mapping of model name to prices, got {type(data).__name__}")
        entries: dict[str, list[UserPrice]] = {}
        for model, specs in data.items():
            if not isinstance(model, str) or not model.strip():
                raise PricesFileError(f"{path}: model {model!r}: the model name must be a non-empty string")
            items = specs if isinstance(specs, list) else [specs]
            for index, spec in enumerate(items):
                where = f"{path}: model {model!r}" + (f" (entry {index + 1})" if isinstance(specs, list) else "")
                entries.setdefault(model.strip().lower(), []).append(_entry(where, model, spec))
        for found in entries.values():  # a provider-, tier- or date-specific entry beats a general one
            found.sort(key=lambda e: (e.provider is None, e.valid_from is None, e.valid_to is None))
        return cls(entries, "user:" + hashlib.sha256(raw).hexdigest()[:12], path)

    def match(
        self, names: tuple[str | None, ...], provider: str | None, when: datetime, service_tier: str | None
    ) -> UserPrice | None:
        for name in names:
            if not name:
                continue
            key = name.strip().lower()
            for candidate in (key, key.rsplit("/", 1)[-1]) if "/" in key else (key,):
                for entry in self._entries.get(candidate, ()):
                    if entry.active(provider, when, service_tier):
                        return entry
        return None

    def dated(self, names: tuple[str | None, ...]) -> bool:
        """Whether an entry filed under one of ``names`` has a period (``valid_from``/``valid_to``)."""
        return any(e.valid_from is not None or e.valid_to is not None for e in self._filed(names))

    def _filed(self, names: tuple[str | None, ...]):
        for name in names:
            if name:
                key = name.strip().lower()
                for candidate in {key, key.rsplit("/", 1)[-1]}:
                    yield from self._entries.get(candidate, ())

    def __len__(self) -> int:
        return len(self._entries)


def _parse(path: str, raw: bytes) -> Any:
    text = raw.decode("utf-8", "replace")
    if path.lower().endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - pyyaml comes with llmtap
            raise PricesFileError(f"{path}: reading YAML needs PyYAML (pip install pyyaml)") from exc
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PricesFileError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise PricesFileError(f"{path}: not valid JSON: {exc}") from exc


def _entry(where: str, model: str, spec: Any) -> UserPrice:
    if not isinstance(spec, dict):
        raise PricesFileError(f"{where}: expected a mapping with input and output, got {type(spec).__name__}")
    unknown = sorted(str(k) for k in spec if k not in _KEYS)
    if unknown:
        raise PricesFileError(f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(sorted(_KEYS))})")
    spec = dict(spec)
    if "cached_input" in spec:
        spec.setdefault("cache_read", spec.pop("cached_input"))
    for required in ("input", "output"):
        if spec.get(required) is None:
            raise PricesFileError(
                f"{where}: missing field {required!r}; each entry needs "
                '{"input": USD, "output": USD} per million tokens (cache_read, cache_write optional)'
            )
    rates = {name: _rate(where, name, spec[name]) for name in _RATES if spec.get(name) is not None}
    tiers = spec.get("tiers") or []
    if not isinstance(tiers, list):
        raise PricesFileError(f"{where}: field 'tiers' must be a list of {{start, input, output, ...}}")
    tiered: dict[str, list[Tier]] = {}
    for number, tier in enumerate(tiers, start=1):
        if not isinstance(tier, dict) or not isinstance(tier.get("start"), int) or tier["start"] < 0:
            raise PricesFileError(f"{where}: tier {number}: missing field 'start' (input tokens, an integer)")
        for name, value in tier.items():
            if name == "start":
                continue
            if name not in rates:
                raise PricesFileError(f"{where}: tier {number}: field {name!r} has no base rate in this entry")
            tiered.setdefault(name, []).append(Tier(start=tier["start"], price=_rate(where, name, value)))
    values: dict[str, Decimal | TieredPrices] = {
        name: TieredPrices(base=rate, tiers=tiered[name]) if name in tiered else rate for name, rate in rates.items()
    }
    provider = spec.get("provider")
    tier_name = spec.get("service_tier")
    for name, value in (("provider", provider), ("service_tier", tier_name)):
        if value is not None and not isinstance(value, str):
            raise PricesFileError(f"{where}: field {name!r} must be a string")
    return UserPrice(
        model=model,
        provider=provider.strip().lower() if provider else None,
        valid_from=_moment(where, "valid_from", spec.get("valid_from")),
        valid_to=_moment(where, "valid_to", spec.get("valid_to")),
        service_tier=normalise_tier(tier_name),
        price=ModelPrice(**{_TO_MTOK[name]: value for name, value in values.items() if name in _TO_MTOK}),
        cache_write_1h=values.get("cache_write_1h"),
        rates={**{k: str(v) for k, v in rates.items()}, **({"tiers": tiers} if tiers else {})},
    )


def _rate(where: str, name: str, value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PricesFileError(f"{where}: field {name!r}: {value!r} is not a number (USD per million tokens)")
    try:
        rate = Decimal(str(value))  # str: 0.1 is 0.1, not the float nearest to it
    except InvalidOperation as exc:
        raise PricesFileError(f"{where}: field {name!r}: {value!r} is not a number") from exc
    if not rate.is_finite() or rate < 0:
        raise PricesFileError(f"{where}: field {name!r}: {value!r} must be a finite number >= 0")
    return rate


def _moment(where: str, name: str, value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    else:
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError as exc:
            raise PricesFileError(f"{where}: field {name!r}: {value!r} is not an ISO date") from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def normalise_tier(value: str | None) -> str | None:
    """OpenAI's ``service_tier`` as priced: the standard tier (``default``/``auto``/``standard``)
    is None; ``flex``, ``priority``, ``scale``, ``batch``... are kept, lower-cased."""
    if not value:
        return None
    tier = value.strip().lower()
    return None if tier in ("default", "auto", "standard", "standard_only") else tier
