"""The maintained price database: pydantic's ``genai-prices``, read offline.

llmtap depends on ``genai-prices==0.0.61``, the last release that installs beside mitmproxy
11.0.2 (0.0.62 and later need ``httpx2`` → ``h11 >= 0.16``; mitmproxy 11 pins ``h11 <= 0.14``).
Its bundled data is used by default. A newer data file in the package's own JSON format (the
``prices/data.json`` of the genai-prices repository, a list of providers) can be loaded with
``--price-data FILE``; it is validated and evaluated by the same package code, without touching
the package's process-wide snapshot. ``genai_prices.UpdatePrices`` (its opt-in network
auto-update) is never started: llmtap makes no network call for prices.

Matching is the package's own (``find_provider`` / ``Provider.find_model``, with its provider
fallbacks such as Azure → OpenAI); llmtap adds no prefix fallback of its own. Each lookup
(provider, model name) is cached, misses too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from genai_prices.data_snapshot import DataSnapshot, find_provider_by_id
from genai_prices.types import ModelInfo, ModelPrice, Provider

#: llmtap's provider names (its host table, Pulze's ``metadata.model.provider``, the GenAI
#: semantic conventions' ``gen_ai.provider.name``) whose genai-prices id the package's own
#: ``provider_match`` would not find, or would find wrongly (Azure would match ``openai``).
PROVIDER_ALIASES = {
    "azure": "azure",
    "azure.ai.openai": "azure",
    "azure.ai.inference": "azure",
    "azure_openai": "azure",
    "aws.bedrock": "aws",
    "bedrock": "aws",
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",
    "gcp.gen_ai": "google",
    "vertex_ai": "google",
    "x_ai": "x-ai",
    "mistral_ai": "mistral",
    "moonshot_ai": "moonshotai",
    "together_ai": "together",
}
_MAX_CACHED = 4096


@dataclass(frozen=True, slots=True)
class DatabaseMatch:
    """A model the database prices: its provider and model entries."""

    provider: Provider
    model: ModelInfo

    @property
    def model_id(self) -> str:
        return f"{self.provider.id}/{self.model.id}"

    def prices_at(self, when: datetime) -> ModelPrice:
        """The model's price in force at ``when`` (dated and time-of-day conditions applied)."""
        return self.model.get_prices(when)


class PriceDatabase:
    """One genai-prices data snapshot, with cached lookups."""

    def __init__(self, snapshot: DataSnapshot, version: str, description: str) -> None:
        self.snapshot = snapshot
        self.version = version  # recorded on every row priced from it
        self.description = description  # for ``llmtap prices``
        self._providers: dict[str | None, Provider | None] = {}
        self._models: dict[tuple[str | None, str], DatabaseMatch | None] = {}

    @classmethod
    def bundled(cls) -> PriceDatabase:
        """The data shipped inside the installed genai-prices package (shared: it is read-only)."""
        global _BUNDLED
        if _BUNDLED is None:
            from genai_prices.data import providers

            release = package_version("genai-prices")
            _BUNDLED = cls(
                DataSnapshot(providers=providers, from_auto_update=False),
                f"genai-prices:{release}",
                f"genai-prices {release} bundled data",
            )
        return _BUNDLED

    @classmethod
    def from_file(cls, path: str) -> PriceDatabase:
        """A data file in genai-prices' own JSON format (``prices/data.json``), read offline."""
        from genai_prices.data import providers_schema

        raw = Path(path).read_bytes()
        providers = providers_schema.validate_json(raw)
        digest = hashlib.sha256(raw).hexdigest()[:12]
        return cls(
            DataSnapshot(providers=providers, from_auto_update=False),
            f"genai-prices-data:{digest}",
            f"genai-prices data file {path} (sha256 {digest}…, evaluated by genai-prices "
            f"{package_version('genai-prices')})",
        )

    def provider(self, name: str | None) -> Provider | None:
        """The database's provider for an llmtap provider name, or None when it has none."""
        try:
            return self._providers[name]
        except KeyError:
            pass
        found = None
        if name:
            key = name.strip().lower()
            found = find_provider_by_id(self.snapshot.providers, PROVIDER_ALIASES.get(key, key))
        if len(self._providers) >= _MAX_CACHED:
            self._providers.clear()
        self._providers[name] = found
        return found

    def match(self, provider: str | None, model: str) -> DatabaseMatch | None:
        """The database's entry for ``model``: within ``provider`` when the database knows that
        provider (and its declared fallbacks), else wherever the package's model matching finds
        it. None when it has no price for it."""
        key = (provider, model)
        try:
            return self._models[key]
        except KeyError:
            pass
        found = self._lookup(provider, model)
        if len(self._models) >= _MAX_CACHED:
            self._models.clear()
        self._models[key] = found
        return found

    def _lookup(self, provider_name: str | None, model: str) -> DatabaseMatch | None:
        ref = model.strip().lower()
        if not ref:
            return None
        provider = self.provider(provider_name)
        try:
            if provider is None:
                provider = self.snapshot.find_provider(ref, None, None)
        except LookupError:
            return None
        info = provider.find_model(ref, all_providers=self.snapshot.providers)
        return None if info is None else DatabaseMatch(provider, info)

    def describe(self) -> dict[str, Any]:
        """Version and size, and the data's date as far as it tells: the latest date a price in
        it starts (the package records no release date in its data)."""
        starts = [
            conditional.constraint.start_date
            for provider in self.snapshot.providers
            for model in provider.models
            if isinstance(model.prices, list)
            for conditional in model.prices
            if getattr(conditional.constraint, "start_date", None) is not None
        ]
        return {
            "version": self.version,
            "description": self.description,
            "providers": len(self.snapshot.providers),
            "models": sum(len(p.models) for p in self.snapshot.providers),
            "latest_price_start": max(starts).isoformat() if starts else None,
        }


_BUNDLED: PriceDatabase | None = None
