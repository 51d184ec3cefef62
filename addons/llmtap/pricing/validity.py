"""Which numbers may become spend: one rule, applied once per record, read by every sink.

Upstreams are not trusted to send sane numbers. A token count or an amount of money that is
negative, not finite, or above a per-exchange ceiling (``--token-ceiling``, default 10^8
tokens; ``--cost-ceiling-usd``, default $1,000) is never spend: the field becomes None (the
cost then ``unknown``), the raw value is kept as a short note in the record's ``anomalies``
(field -> note), and ``llmtap_anomalies_total{field}`` counts it. One bad field costs that
field only; the record keeps everything else.

Pulze's ``cost_savings`` are a difference against a reference model and may legitimately be
negative: they stay as reported unless they are not finite or beyond the cost ceiling.

The metrics sink adds only ``spend_amount(value)`` to its counters, and the audit log stores the
same cleaned record, so ``llmtap_cost_usd_total`` and the audit log's ``sum(cost_usd)`` agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

#: Token counts of a record, checked against the token ceiling.
TOKEN_FIELDS = ("input_tokens", "output_tokens", "total_tokens", "cached_input_tokens", "reasoning_tokens")
#: Amounts of money that are spend (never negative).
SPEND_FIELDS = ("reported_cost_usd", "cost_prompt_usd", "cost_completion_usd")
#: Amounts that may be negative (a saving against a reference model can be a loss).
SIGNED_FIELDS = ("cost_savings_usd", "cost_savings_prompt_usd", "cost_savings_completion_usd")


class Ceilings(NamedTuple):
    """Per-exchange bounds above which a number is an anomaly, not spend."""

    tokens: int = 10**8
    cost_usd: float = 1000.0


DEFAULT_CEILINGS = Ceilings()


def spend_amount(value: Any) -> float | None:
    """A value a spend counter may add: a finite, non-negative number; else None."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        if not math.isfinite(value) or value < 0:
            return None
    except OverflowError:  # an int beyond a float's range
        return None
    return value


def count_problem(value: Any, ceilings: Ceilings) -> str | None:
    """Why ``value`` is not a token count (None when it is one)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "not finite"
    if isinstance(value, bool) or not isinstance(value, int):
        return "not an integer"
    if value < 0:
        return "negative"
    if value > ceilings.tokens:
        return f"above the ceiling of {ceilings.tokens} tokens"
    return None


def amount_problem(value: Any, ceilings: Ceilings, *, signed: bool = False) -> str | None:
    """Why ``value`` is not an amount of USD (None when it is one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "not a number"
    try:
        number = float(value)
    except OverflowError:
        return "not finite"
    if not math.isfinite(number):
        return "not finite"
    if not signed and number < 0:
        return "negative"
    if abs(number) > ceilings.cost_usd:
        return f"above the ceiling of ${ceilings.cost_usd:g}"
    return None


def note(value: Any, problem: str) -> str:
    """The anomaly note: the raw value, bounded, and what is wrong with it."""
    try:
        raw = repr(value)
    except ValueError:  # an int too long to print
        raw = "<huge integer>"
    if len(raw) > 40:
        raw = raw[:24] + f"…({len(raw)} chars)"
    return f"{raw}: {problem}"


def check_fields(
    fields: Mapping[str, Any], ceilings: Ceilings = DEFAULT_CEILINGS
) -> tuple[dict[str, Any], dict[str, str]]:
    """The corrections for ``fields`` (bad numbers set to None) and the notes on what was wrong.

    Never raises: whatever a parser put in ``fields``, the answer is usable.
    """
    changes: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for name in TOKEN_FIELDS:
        value = fields.get(name)
        if value is not None and (problem := count_problem(value, ceilings)):
            changes[name], notes[name] = None, note(value, problem)
    for names, signed in ((SPEND_FIELDS, False), (SIGNED_FIELDS, True)):
        for name in names:
            value = fields.get(name)
            if value is not None and (problem := amount_problem(value, ceilings, signed=signed)):
                changes[name], notes[name] = None, note(value, problem)
    return changes, notes
