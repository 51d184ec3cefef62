"""OpenRouter: the OpenAI shapes plus ``usage.cost`` (USD) and ``usage.is_byok``.

``usage.cost`` is what OpenRouter charged. With BYOK (bring your own key, ``is_byok: true``)
the provider bills the user's own key and ``cost`` is only OpenRouter's fee; the provider's
charge is ``usage.cost_details.upstream_inference_cost``: the reported cost is their sum. When
a BYOK answer lacks the upstream charge, the cost is not known (None), never the fee alone.
"""

from __future__ import annotations

from typing import Any

from llmtap.protocols.base import Overlay
from llmtap.protocols.values import as_float


def is_openrouter_host(host: str | None) -> bool:
    return bool(host) and (host == "openrouter.ai" or host.endswith(".openrouter.ai"))


def cost_of(usage: dict[str, Any]) -> float | None:
    """USD of the whole exchange, or None when it is not known."""
    cost = as_float(usage.get("cost"))
    if cost is None or usage.get("is_byok") is not True:
        return cost
    details = usage.get("cost_details")
    upstream = as_float(details.get("upstream_inference_cost")) if isinstance(details, dict) else None
    return None if upstream is None else cost + upstream


class OpenRouterOverlay(Overlay):
    router = "openrouter"

    def applies(self, host: str | None, body: dict[str, Any]) -> bool:
        usage = body.get("usage")
        return is_openrouter_host(host) or (isinstance(usage, dict) and "is_byok" in usage)

    def response_fields(self, body: dict[str, Any], keep_content: bool) -> dict[str, Any]:
        usage = body.get("usage")
        return {"reported_cost_usd": cost_of(usage)} if isinstance(usage, dict) else {}


OVERLAY = OpenRouterOverlay()
