"""The record's canonical JSON: ``to_json`` takes shortcuts, and must still match the contract byte for byte."""

from __future__ import annotations

import enum
import json
import math
import types

import pytest

from llmtap.record import FIELD_NAMES, ExchangeRecord, canonical_json


class Status(enum.IntEnum):
    OK = 200


class Text(str):
    pass


def strict(value):
    """JSON has no NaN or infinity: the contract writes them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict | types.MappingProxyType):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


def contract(value) -> str:
    """The documented form: what json.dumps makes with the canonical options (strict JSON)."""
    return json.dumps(
        strict(value),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
        default=lambda mapping: dict(mapping),
    )


ODD_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    2**80,
    Status.OK,
    0.1,
    -0.0,
    1e-300,
    1.7e9 + 0.123,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "plain",
    'quote " backslash \\ newline \n tab \t nul \x00',
    "Zürich 日本 🙂",
    "lone \ud800 surrogate",
    "\u2028",
    "%s %d %%",
    Text("str subclass"),
    ("stop", "END"),
    (),
    ({"role": "user", "content": "é"},),
    {"b": 1, "a": {"z": [1, 2.5, None], "y": "ü"}},
    types.MappingProxyType({"k": "v"}),
    {},
]


@pytest.mark.parametrize("value", ODD_VALUES, ids=repr)
def test_to_json_is_the_canonical_form_for_any_value(value) -> None:
    names = [n for n in FIELD_NAMES if n not in ("exchange_id", "operation", "method", "path", "request_start")]
    record = ExchangeRecord("id", "chat", "POST", "/v1/chat/completions", 1.5, **{name: value for name in names})
    assert record.to_json() == contract(record.to_dict()) == canonical_json(record.to_dict())


def test_canonical_json_recovers_after_a_value_it_cannot_encode() -> None:
    for _ in range(2):
        with pytest.raises(TypeError):
            canonical_json({"a": [object()]})
        assert canonical_json({"b": [1], "a": {"d": 1, "c": 2}}) == '{"a":{"c":2,"d":1},"b":[1]}'


def test_from_fields_ignores_other_keys_and_defaults_the_rest() -> None:
    fields = {
        "exchange_id": "id",
        "operation": "chat",
        "method": "POST",
        "path": "/v1",
        "request_start": 1.0,
        "input_tokens": 3,
        "reported_cost_usd": 0.5,
    }
    record = ExchangeRecord.from_fields(fields)
    assert record == ExchangeRecord("id", "chat", "POST", "/v1", 1.0, input_tokens=3)
    assert record.cost_source == "unknown" and record.stream is False
