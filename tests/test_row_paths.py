"""The audit writer's row fast path against the reference row builder, on generated records.

``RowBuilder`` answers most records from cached per-type plans; ``row_builder`` defines what a
row is. For any record, both must give the same hashed body and the same column values.
"""

from __future__ import annotations

import dataclasses
import json
import typing

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmtap.audit.rows import HELD, RowBuilder
from llmtap.audit.sqlite import AuditStore
from llmtap.record import ExchangeRecord

PROPERTY = settings(
    derandomize=True, database=None, deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow]
)

TEXT = st.text(max_size=12)
NUMBERS = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False, allow_infinity=False))
ODD = st.one_of(
    st.none(), st.booleans(), NUMBERS, TEXT, st.lists(TEXT, max_size=3), st.dictionaries(TEXT, TEXT, max_size=3)
)


def _strategy(annotation: typing.Any, odd: bool) -> st.SearchStrategy:
    """A value of the field's own type or None; with ``odd``, sometimes anything JSON can hold."""
    name = str(annotation)
    if "Mapping" in name:
        own = st.dictionaries(TEXT, st.one_of(TEXT, NUMBERS), max_size=3)
    elif "tuple" in name:
        own = st.lists(st.one_of(TEXT, st.dictionaries(TEXT, TEXT, max_size=2)), max_size=3)
    elif name.startswith("int") or name == "int | None":
        own = st.integers(min_value=-(2**63), max_value=2**63 - 1)
    elif name.startswith("float"):
        own = NUMBERS
    elif name.startswith("bool") or annotation is bool:  # `stream: bool` prints as "<class 'bool'>"
        own = st.booleans()
    else:
        own = TEXT
    return st.one_of(st.none(), own, own, ODD) if odd else st.one_of(st.none(), own)


HINTS = typing.get_type_hints(ExchangeRecord)


def _records(odd: bool) -> st.SearchStrategy:
    return st.fixed_dictionaries(
        {
            f.name: st.text(min_size=1, max_size=8)
            if f.name in ("exchange_id", "operation", "method", "path")
            else st.floats(min_value=0, max_value=4e9)
            if f.name == "request_start"
            else _strategy(HINTS[f.name], odd)
            for f in dataclasses.fields(ExchangeRecord)
            if f.init
        }
    )


@st.composite
def _pulze_records(draw: st.DrawFn) -> dict:
    """Records whose Pulze metadata repeats some of their columns (left out of the remainder)
    and holds other values for others (kept)."""
    data = draw(_records(odd=False))
    metadata: dict = {}
    for parent, key, name in HELD:
        if draw(st.booleans()):
            value = data[name] if draw(st.booleans()) else draw(ODD)
            (metadata if parent is None else metadata.setdefault(parent, {}))[key] = value
    return data | {"metadata": metadata}


#: Records as llmtap writes them (the fast path's case), records with odd values anywhere, and
#: Pulze records whose metadata the remainder shrinks.
RECORD_DATA = st.one_of(_records(odd=False), _records(odd=True), _pulze_records())


def test_fast_path_and_reference_give_the_same_row(tmp_path) -> None:
    store = AuditStore(str(tmp_path / "rows.db"), fsync_batch=False, capture_content=False)
    builder = RowBuilder(store.types)
    store.close()
    fast_rows = []

    @PROPERTY
    @given(RECORD_DATA)
    def same_row(data: dict) -> None:
        parsed = json.loads(json.dumps(data))  # what the writer holds: a journal line, parsed
        fast_rows.append(builder._fast(parsed) is not None)
        fast_sql, fast_params, fast_body = builder(parsed, clean=True)
        ref_sql, ref_params, ref_body = builder(parsed, clean=False)
        assert fast_body == ref_body
        assert _by_column(fast_sql, fast_params) == _by_column(ref_sql, ref_params)

    same_row()
    # the comparison means something only if generated records take the fast path too
    assert fast_rows.count(True) >= len(fast_rows) // 10, (fast_rows.count(True), len(fast_rows))


def _by_column(sql: str, params: list) -> dict:
    """Column name -> value of an ``INSERT INTO exchanges (a, b, …) VALUES (?, …)``."""
    names = sql[sql.index("(") + 1 : sql.index(")")].split(",")
    return {name.strip().strip('"'): value for name, value in zip(names, params)}
