"""Pulze.ai: its request headers and the ``metadata`` object of its responses.

Facts that bite (see docs/facts): ``metadata.costs`` and ``metadata.cost_savings`` are USD
amounts although their keys say ``*_tokens``; ``metadata.latency`` is the provider's time in
seconds; ``metadata.model.namespace`` is the served model as ``provider/model``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from llmtap.protocols.base import Overlay
from llmtap.protocols.values import as_float, as_int, as_number, as_str


def is_pulze_host(host: str | None) -> bool:
    return bool(host) and (host == "pulze.ai" or host.endswith(".pulze.ai"))


def header_fields(headers: Mapping[str, str]) -> dict[str, Any]:
    """``Pulze-Labels``, ``Pulze-Weights``, ``Pulze-Policies``: JSON objects, or None if absent/invalid."""
    labels = _json_object(headers.get("pulze-labels"))
    return {
        "labels": _str_map(labels),
        "weights": _json_object(headers.get("pulze-weights")),
        "policies": _json_object(headers.get("pulze-policies")),
    }


#: Parts of ``metadata`` that carry generated or retrieved text, not facts about the call.
CONTENT_KEYS = frozenset({"generated_artifacts", "search_results"})


def metadata_fields(metadata: Any, keep_content: bool) -> dict[str, Any]:
    """Record fields from a Pulze ``metadata`` object (missing or null parts stay None).

    The raw object is kept whole for the audit log, less ``CONTENT_KEYS`` unless the user
    opted in to content capture.
    """
    if not isinstance(metadata, dict):
        return {}
    model = _mapping(metadata.get("model"))
    costs = _mapping(metadata.get("costs"))
    savings = _mapping(metadata.get("cost_savings"))
    scores = _mapping(metadata.get("scores"))
    labels = metadata.get("labels")
    if keep_content or CONTENT_KEYS.isdisjoint(metadata):
        kept = metadata  # no copy: the parsed body it belongs to is not used again
    else:
        kept = {k: v for k, v in metadata.items() if k not in CONTENT_KEYS}
    return {
        "metadata": kept,
        "app_id": as_str(metadata.get("app_id")),
        "served_model": as_str(model.get("model")),
        "served_provider": as_str(model.get("provider")),
        "served_owner": as_str(model.get("owner")),
        "served_namespace": as_str(model.get("namespace")),
        "served_at": as_str(model.get("at")),
        "cost_prompt_usd": as_number(costs.get("prompt_tokens")),
        "cost_completion_usd": as_number(costs.get("completion_tokens")),
        "reported_cost_usd": _total(costs),
        "cost_savings_prompt_usd": as_number(savings.get("prompt_tokens")),
        "cost_savings_completion_usd": as_number(savings.get("completion_tokens")),
        "cost_savings_usd": _total(savings),
        "upstream_latency_s": as_float(metadata.get("latency")),
        "retries": as_int(metadata.get("retries")),
        "upstream_status_code": as_int(metadata.get("status_code")),
        "score": as_float(metadata.get("score")),
        "best_model": _best_model(scores.get("best_models")),
        "candidate_count": len(scores["candidates"]) if isinstance(scores.get("candidates"), list) else None,
        "response_labels": _str_map(labels),
        "warning": as_str(metadata.get("warning")),
        "upstream_error": as_str(metadata.get("error")),
        "category": as_str(metadata.get("category")),
    }


def _total(amounts: dict[str, Any]) -> float | int | None:
    """The total as sent, else the sum of the parts; not checked here (``pricing.validity`` does)."""
    total = as_number(amounts.get("total_tokens"))
    if total is not None:
        return total
    parts = [as_number(amounts.get(k)) for k in ("prompt_tokens", "completion_tokens")]
    if None in parts:
        return None
    try:
        return parts[0] + parts[1]
    except OverflowError:  # an int beyond a float's range plus a float
        return math.inf


def _best_model(best_models: Any) -> str | None:
    """``scores.best_models`` is a list of ``{namespace: score}`` maps (or plain names)."""
    if not isinstance(best_models, list) or not best_models:
        return None
    first = best_models[0]
    if isinstance(first, dict) and first:
        return str(next(iter(first)))
    return as_str(first)


def _str_map(value: Any) -> dict[str, str] | None:
    """Labels are ``Dict[str, str]``; whatever else arrives is stringified, non-objects dropped."""
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _json_object(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class PulzeOverlay(Overlay):
    """Pulze answers in the OpenAI shape plus ``metadata``; its request headers carry labels."""

    router = "pulze"
    families = frozenset({"chat_completions"})

    def applies(self, host: str | None, body: dict[str, Any]) -> bool:
        return is_pulze_host(host) or bool(_mapping(body.get("metadata")))

    def request_fields(self, headers: Mapping[str, str]) -> dict[str, Any]:
        return header_fields(headers)

    def response_fields(self, body: dict[str, Any], keep_content: bool) -> dict[str, Any]:
        return metadata_fields(body.get("metadata"), keep_content)


OVERLAY = PulzeOverlay()
