"""Rows and the hash chain: what every audit store (SQLite, PostgreSQL) shares.

A journaled record becomes one ``exchanges`` row (``row_builder`` is the reference
definition; ``RowBuilder`` its fast path), and each row is chained to the one before it in
its chain (one chain per store with SQLite, one per instance with PostgreSQL)::

    row_hash = sha256(prev_digest + utf8(canonical_json(body)))      # 32 raw bytes

where ``prev_digest`` is the previous row's 32-byte digest (``GENESIS_DIGEST``, 32 zero
bytes, for the first row; after retention pruned the oldest rows, the anchor: the digest of
the last row deleted), the row's ``prev_hash`` (SQLite stores it empty, implied by the row
before: ``llmtap.audit.sqlite.IMPLIED``); ``body`` maps every hashed column
of the row (all but ``id``, ``prev_hash``, ``row_hash`` and the store's own bookkeeping
columns) whose value is not NULL to the value as written (JSON columns as their canonical
text), ``canonical_json`` is sorted keys, ``","``/``":"`` separators, non-ASCII kept as UTF-8,
floats in Python ``repr`` form. SQLite stores the digest as a BLOB, PostgreSQL both as ``bytea``
(``prev_digest``, ``row_digest``: its replay check re-hashes a replayed record on the stored link).
SQLite also stores llmtap's own ids as raw bytes (``PACKED_IDS``); the body holds their text.
People, logs and saved heads see a digest as ``"sha256:" + hex(digest)`` (``as_hex``).

Rows written before this lean format stored the hash as text and
chained on it::

    row_hash = "sha256:" + hex(sha256(utf8(prev_hash + canonical_json(body))))

with ``prev_hash`` the previous row's text (``GENESIS`` = ``"sha256:" + "0" * 64``). Such
rows keep their hashes and verify as they are; the first new row chains on from the last old
one's digest. A row's format is its hash's type: TEXT (SQLite) or the text columns
(PostgreSQL) for the old one, BLOB / ``bytea`` for the new. Migrations only ever add nullable
columns, so old rows keep their hashes.

The new rows' ``metadata_json`` holds only the part of the router's raw ``metadata`` object
that no column holds (``metadata_remainder``): a leaf listed in ``HELD`` is left out when its
canonical JSON equals that of its column's value, and the remainder's ``"~"`` key is the
bitmask of the leaves left out (bit *i* = ``HELD[i]``; a top-level key of tildes only, which
the object itself may have, gains one ``~``). The two bits after ``HELD``'s leave out the
router's pick from ``scores`` when it is exactly ``{best_model: score}`` of the row's columns
(``best_models`` as that one pick; the first of ``candidates``). ``metadata_of(row)`` gives the
whole object back.
The hash covers the remainder, as stored, like any column.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from json.encoder import encode_basestring
from typing import Any, NamedTuple

import orjson

from llmtap.record import canonical_json

GENESIS = "sha256:" + "0" * 64
GENESIS_DIGEST = bytes(32)
#: Columns holding JSON text (the record's mappings and lists).
JSON_COLUMNS = frozenset(
    {
        "labels",
        "weights",
        "policies",
        "stop",
        "tool_names",
        "tool_types",
        "finish_reasons",
        "response_labels",
        "metadata_json",
        "anomalies",
    }
)
#: Columns outside the hashed body: the row's key, its chain links, and PostgreSQL's chain key.
UNHASHED = frozenset({"id", "prev_hash", "row_hash", "instance_id"})
_UNHASHED = UNHASHED


def row_builder(types: Mapping[str, str]) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """A function from a journaled record (``ExchangeRecord.to_dict()`` as parsed from its JSON
    line) to its ``exchanges`` row, each value coerced to its column's declared type.

    Coercion makes every value read back exactly as it was hashed (SQLite would turn an int in
    a REAL column into a float, a bool into 0/1, NaN into NULL). A value that does not fit its
    type becomes NULL; ``metadata_json`` keeps what of the raw router metadata no column holds
    (``metadata_remainder``), so the whole object can be rebuilt either way.
    The writer maps the parsed dict directly, without rebuilding the record, and most records
    through ``RowBuilder``'s shortcut, which must give the same rows.
    """
    plan = [
        (name, _SOURCES.get(name, name), _to_json if name in JSON_COLUMNS else _CONVERTERS.get(kind, _to_text))
        for name, kind in types.items()
        if name not in _ELAPSED
    ]
    elapsed = [(name, end) for name, end in _ELAPSED.items() if name in types]

    def build(data: Mapping[str, Any]) -> dict[str, Any]:
        row = {}
        for name, key, convert in plan:
            value = data.get(key)
            row[name] = None if value is None else convert(value)
        start = _to_real(data.get("request_start"))
        for name, key in elapsed:
            end = _to_real(data.get(key))
            row[name] = None if start is None or end is None else max(0.0, end - start)
        if row.get("metadata_json") is not None:
            row["metadata_json"] = _to_json(
                metadata_remainder(data["metadata"], [row.get(name) for name in HELD_COLUMNS])
            )
        return row

    return build


def _to_integer(value: Any) -> int | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return int(value) if isinstance(value, int) and -(2**63) <= value < 2**63 else None


def _to_real(value: Any) -> float | None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value) or 0.0  # -0.0 would read back as 0.0


def _to_text(value: Any) -> str:
    return _text(value if isinstance(value, str) else canonical_json(value))


def _to_json(value: Any) -> str:
    return _text(canonical_json(value))


_CONVERTERS = {"INTEGER": _to_integer, "REAL": _to_real}
#: Columns named differently from the record field they hold.
_SOURCES = {"metadata_json": "metadata"}
#: Derived columns: seconds from request_start to this field (ExchangeRecord.duration_s and
#: .time_to_first_token_s, computed from the journaled dict).
_ELAPSED = {"duration_s": "response_end", "ttft_s": "first_token_at"}


def _text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


#: Leaves of Pulze's ``metadata`` that a column holds as well: (parent key or None, key,
#: column). Bit i of a remainder's mask is entry i: append only.
HELD = (
    (None, "app_id", "app_id"),
    ("model", "model", "served_model"),
    ("model", "provider", "served_provider"),
    ("model", "owner", "served_owner"),
    ("model", "namespace", "served_namespace"),
    ("model", "at", "served_at"),
    ("costs", "prompt_tokens", "cost_prompt_usd"),
    ("costs", "completion_tokens", "cost_completion_usd"),
    ("costs", "total_tokens", "cost_usd"),
    ("cost_savings", "prompt_tokens", "cost_savings_prompt_usd"),
    ("cost_savings", "completion_tokens", "cost_savings_completion_usd"),
    ("cost_savings", "total_tokens", "cost_savings_usd"),
    (None, "latency", "upstream_latency_s"),
    (None, "retries", "retries"),
    (None, "status_code", "upstream_status_code"),
    (None, "score", "score"),
    (None, "labels", "response_labels"),
    (None, "warning", "warning"),
    (None, "error", "upstream_error"),
    (None, "category", "category"),
    (None, "temperature", "temperature"),
    (None, "max_tokens", "max_tokens"),
)
#: The remainder's key for the mask of the leaves left out.
MASK_KEY = "~"
#: The bits after ``HELD``'s: ``scores.best_models`` left out as ``[{best_model: score}]``, and the
#: first of ``scores.candidates`` as ``{best_model: score}`` (the router's pick is both, as a rule).
BEST_MODELS_BIT, FIRST_CANDIDATE_BIT = len(HELD), len(HELD) + 1

#: The columns ``metadata_remainder`` compares the metadata with: ``HELD``'s, in its order, then ``best_model``.
HELD_COLUMNS = (*(name for _, _, name in HELD), "best_model")
_HELD_PLAN = tuple((1 << bit, parent, key, name in JSON_COLUMNS) for bit, (parent, key, name) in enumerate(HELD))
_SCORE = HELD_COLUMNS.index("score")


def metadata_remainder(metadata: Any, held: Sequence[Any]) -> Any:
    """What of ``metadata`` no column holds, and the mask of what it leaves out (see the module
    docstring). ``held``: the row's values of ``HELD_COLUMNS``, as hashed. ``metadata`` is not
    changed (the writer builds spans from it)."""
    if not isinstance(metadata, dict):
        return metadata
    # a key of tildes sorts at or after "~" (max() looks in C: this runs for every Pulze row)
    rest = _escape_tildes(metadata) if metadata and max(metadata) >= MASK_KEY else dict(metadata)
    copied: list[str] = []
    mask = 0
    for (flag, parent, key, json_column), value in zip(_HELD_PLAN, held):
        holder = rest if parent is None else rest.get(parent)
        if not isinstance(holder, dict) or key not in holder:
            continue
        leaf = holder[key]  # dropped only when the column's value has the same canonical JSON:
        if json_column:
            if not (leaf is None if value is None else type(leaf) in (dict, list) and canonical_json(leaf) == value):
                continue
        elif not _same_scalar(leaf, value):
            continue
        if parent is not None and parent not in copied:
            holder = rest[parent] = dict(holder)
            copied.append(parent)
        del holder[key]
        mask |= flag
    scores = rest.get("scores")
    if isinstance(scores, dict) and held[-1] is not None and held[_SCORE] is not None:
        scores, mask = _scores_remainder(scores, {held[-1]: held[_SCORE]}, mask)
        if scores is not None:
            rest["scores"] = scores
            copied.append("scores")
    for parent in copied:
        if not rest[parent]:
            del rest[parent]  # rebuilt from its leaves' bits
    if mask:
        rest[MASK_KEY] = mask
    return rest


def _scores_remainder(scores: dict[str, Any], best: dict[str, float], mask: int) -> tuple[dict[str, Any] | None, int]:
    """``scores`` without the router's pick where it is exactly ``best`` (None: nothing left out)."""
    picked = scores.get("best_models")
    candidates = scores.get("candidates")
    drop_best = isinstance(picked, list) and len(picked) == 1 and _same_pick(picked[0], best)
    drop_first = isinstance(candidates, list) and bool(candidates) and _same_pick(candidates[0], best)
    if not (drop_best or drop_first):
        return None, mask
    scores = dict(scores)
    if drop_best:
        del scores["best_models"]
        mask |= 1 << BEST_MODELS_BIT
    if drop_first:
        scores["candidates"] = candidates[1:]
        if not scores["candidates"]:
            del scores["candidates"]  # rebuilt as [pick]
        mask |= 1 << FIRST_CANDIDATE_BIT
    return scores, mask


def _same_pick(value: Any, best: dict[str, float]) -> bool:
    """Whether a ``{name: score}`` of the metadata is the row's pick, as JSON."""
    if not isinstance(value, dict) or value.keys() != best.keys():
        return False
    (score,) = value.values()
    (column,) = best.values()
    return _same_scalar(score, column)


def _same_scalar(leaf: Any, value: Any) -> bool:
    """Whether a metadata leaf is a column's scalar value, as JSON: 1 and 1.0, true and 1
    differ; equal floats of one sign have one repr (a column holds no NaN)."""
    if type(leaf) is not type(value) or leaf != value:
        return False
    return not (type(leaf) is float and leaf == 0.0 and math.copysign(1.0, leaf) != math.copysign(1.0, value))


def _is_tildes(key: str) -> bool:
    return bool(key) and key.strip(MASK_KEY) == ""


def _escape_tildes(metadata: dict[str, Any]) -> dict[str, Any]:
    return {MASK_KEY + key if _is_tildes(key) else key: value for key, value in metadata.items()}


def is_lean(row: Mapping[str, Any]) -> bool:
    """Whether a stored row is of the lean format (a digest, not the old text hash)."""
    return isinstance(row.get("row_hash"), bytes) or row.get("row_digest") is not None


def metadata_of(row: Mapping[str, Any]) -> Any:
    """The router's raw ``metadata`` object of a stored row (its values as hashed), whole:
    the remainder with the leaves its mask names put back from their columns."""
    stored = row.get("metadata_json")
    value = json.loads(stored) if isinstance(stored, str) else stored
    if not is_lean(row) or not isinstance(value, dict):
        return value
    mask = value.pop(MASK_KEY, 0)
    if any(key[:1] == MASK_KEY for key in value):
        value = {key[1:] if _is_tildes(key) else key: item for key, item in value.items()}
    for bit, (parent, key, name) in enumerate(HELD):
        if mask >> bit & 1:
            column = row.get(name)
            if name in JSON_COLUMNS and isinstance(column, str):
                column = json.loads(column)
            elif isinstance(column, Decimal):  # PostgreSQL's numeric: a REAL column's float
                column = float(column)
            (value if parent is None else value.setdefault(parent, {}))[key] = column
    if mask >> BEST_MODELS_BIT:
        score = row.get("score")
        best = {row.get("best_model"): float(score) if isinstance(score, Decimal) else score}
        scores = value.setdefault("scores", {})
        if mask >> BEST_MODELS_BIT & 1:
            scores["best_models"] = [best]
        if mask >> FIRST_CANDIDATE_BIT & 1:
            scores["candidates"] = [best, *scores.get("candidates", ())]
    return value


def chain_hash(prev: bytes, row: Mapping[str, Any]) -> bytes:
    """``row_hash`` of a new row (see the module docstring for the canonical form)."""
    return chain_digest(prev, _body_json(row))


def chain_digest(prev: bytes, body_json: str) -> bytes:
    """A new row's 32-byte hash from its predecessor's digest and its body's canonical JSON."""
    return hashlib.sha256(prev + body_json.encode("utf-8")).digest()


def legacy_hash(prev_hash: str, body_json: str) -> str:
    """An old row's text hash (the format before the lean one)."""
    return "sha256:" + hashlib.sha256((prev_hash + body_json).encode("utf-8")).hexdigest()


def as_digest(stored: bytes | str) -> bytes:
    """A stored hash of either format (or a shown one) as its 32-byte digest."""
    return stored if isinstance(stored, bytes) else bytes.fromhex(stored.removeprefix("sha256:"))


def as_hex(stored: bytes | str) -> str:
    """A stored hash of either format as people and saved heads see it: ``sha256:<hex>``."""
    return "sha256:" + stored.hex() if isinstance(stored, bytes) else stored


def link_fault(prev: bytes, stored_prev: Any, stored_hash: Any, body_json: str) -> str | None:
    """Why a stored row does not follow a row of digest ``prev`` (None: it does), either format."""
    if isinstance(stored_hash, bytes):
        expected_prev, expected = prev, chain_digest(prev, body_json)
    else:
        expected_prev = as_hex(prev)
        expected = legacy_hash(expected_prev, body_json)
    if stored_prev != expected_prev:
        return "prev_hash does not match the row before it (a row was removed, inserted or reordered)"
    if stored_hash != expected and isinstance(stored_hash, bytes):  # the digest commits to the row before too
        return "row_hash does not match the row's contents or the row before it (the row was edited, or one before it removed)"
    if stored_hash != expected:
        return "row_hash does not match the row's contents (the row was edited)"
    return None


def _body_json(row: Mapping[str, Any]) -> str:
    return canonical_json({name: value for name, value in row.items() if value is not None and name not in _UNHASHED})


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class _Plan(NamedTuple):
    """What ``RowBuilder`` does with the values of one combination of value types."""

    convert: tuple[tuple[int, Callable[[Any], Any]], ...]  # bools and ints to int/float, JSON to text
    elapsed: tuple[int, ...]  # duration_s and ttft_s, holding their end time until computed
    reals: Callable[[Sequence[Any]], tuple[float, ...]]  # checked finite, and -0.0 made 0.0
    real_positions: tuple[int, ...]
    ints: Callable[[Sequence[Any]], tuple[int, ...]]  # checked to fit in 64 bits
    texts: Callable[[Sequence[Any]], tuple[str, ...]]  # JSON columns' text: escaped for the body
    strs: Callable[[Sequence[Any]], tuple[str, ...]]  # TEXT columns' strings: copied into the body
    names: tuple[str, ...]  # the non-NULL columns, sorted: the body's keys
    values: Callable[[Sequence[Any]], tuple[Any, ...]]  # their values
    body: Callable[[Sequence[Any]], tuple[Any, ...]]  # the same, JSON texts escaped (appended)
    template: str  # the body's canonical JSON with a %-placeholder per value
    insert: str  # the INSERT of these columns
    metadata: int | None  # metadata_json, made the remainder once the other columns are final


class RowBuilder:
    """Journaled records to ``exchanges`` rows: the INSERT, its parameters, the hashed body.

    ``row_builder`` defines the coercion; this is its shortcut for llmtap's own records, whose
    values almost always have their column's type already. What one combination of value types
    needs (a few conversions and range checks, the body as a %-template, the non-NULL
    columns) is worked out once and cached, which leaves a handful of C calls per row.
    Anything else (an odd value, a line with a ``\\u`` escape, which may be a lone surrogate, a
    record of an older llmtap that lacks a field) goes through ``row_builder``.
    """

    def __init__(self, types: Mapping[str, str]) -> None:
        self.columns = sorted(name for name in types if name not in _UNHASHED)
        self._general = row_builder(types)
        self._kinds = [
            "ELAPSED" if name in _ELAPSED else "JSON" if name in JSON_COLUMNS else types[name] for name in self.columns
        ]
        # an elapsed column holds its end time until the row's request_start is known
        self._get = operator.itemgetter(*[_ELAPSED.get(name) or _SOURCES.get(name, name) for name in self.columns])
        self._start = self.columns.index("request_start") if "request_start" in self.columns else None
        self._held = operator.itemgetter(*[self.columns.index(name) for name in HELD_COLUMNS])
        self._plan = functools.lru_cache(maxsize=256)(self._compile)

    def __call__(self, data: Mapping[str, Any], *, clean: bool) -> tuple[str, list[Any], str]:
        """The row's INSERT (of its non-NULL columns), their values (the last two, prev_hash and row_hash, left None)
        and the canonical JSON of its body. ``clean``: no string in ``data`` holds a lone
        surrogate."""
        row = self._fast(data) if clean else None
        if row is None:
            general = self._general(data)
            names = tuple(name for name in self.columns if general[name] is not None)
            row = insert_sql(names), [*map(general.__getitem__, names), None, None], _body_json(general)
        return row

    def _fast(self, data: Mapping[str, Any]) -> tuple[str, list[Any], str] | None:
        try:
            values = list(self._get(data))
        except KeyError:
            return None
        plan = self._plan(tuple(map(type, values)))
        if plan is None:
            return None
        for position, convert in plan.convert:
            values[position] = convert(values[position])
        if plan.elapsed:
            start = values[self._start]
            for position in plan.elapsed:
                values[position] = max(0.0, values[position] - start)
        reals = plan.reals(values)
        total = sum(reals)
        if total - total:  # NaN or an infinity (or a sum that overflowed)
            return None
        if 0.0 in reals:
            for position in plan.real_positions:
                if values[position] == 0.0:
                    values[position] = 0.0  # -0.0 would read back as 0.0
        ints = plan.ints(values)
        if ints and (min(ints) < _INT64_MIN or max(ints) > _INT64_MAX):
            return None
        if plan.metadata is not None:
            values[plan.metadata] = canonical_json(metadata_remainder(values[plan.metadata], self._held(values)))
        present = plan.values(values)
        strs = "".join(plan.strs(values))
        if '"' in strs or "\\" in strs or not strs.isprintable():  # a string the body must escape
            body = canonical_json(dict(zip(plan.names, present)))
        else:
            body = plan.template % plan.body([*values, *map(encode_basestring, plan.texts(values))])
        return plan.insert, [*present, None, None], body

    def _compile(self, signature: tuple[type, ...]) -> _Plan | None:
        """The plan for values of these types, or None when one needs ``row_builder``."""
        if self._start is None or signature[self._start] not in (float, int):
            return None
        convert, elapsed, reals, ints, texts, strs = [], [], [], [], [], []
        metadata = None
        names, present, body, layout = [], [], [], []  # the body: its keys, values, placeholders
        for position, (name, kind, seen) in enumerate(zip(self.columns, self._kinds, signature)):
            if seen is type(None):
                continue
            names.append(name)
            present.append(position)
            body.append(position)
            if kind == "JSON":
                if seen not in (dict, list):
                    return None
                if name == "metadata_json":
                    metadata = position
                else:
                    convert.append((position, canonical_json))
                body[-1] = len(signature) + len(texts)  # the escaped text, appended to the values
                texts.append(position)
                layout.append("%s")
            elif kind == "INTEGER":
                if seen is bool:
                    convert.append((position, int))
                elif seen is int:
                    ints.append(position)
                else:
                    return None
                layout.append("%d")
            elif kind in ("REAL", "ELAPSED"):
                if seen is int:
                    convert.append((position, float))
                elif seen is not float:
                    return None
                if kind == "ELAPSED":
                    elapsed.append(position)
                if seen is float or kind == "ELAPSED":
                    reals.append(position)
                layout.append("%r")
            elif seen is str:
                strs.append(position)
                layout.append('"%s"')
            else:
                return None
        keys = [encode_basestring(name).replace("%", "%%") for name in names]
        return _Plan(
            tuple(convert),
            tuple(elapsed),
            _picker(reals),
            tuple(reals),
            _picker(ints),
            _picker(texts),
            _picker(strs),
            tuple(names),
            _picker(present),
            _picker(body),
            "{" + ",".join(f"{key}:{spec}" for key, spec in zip(keys, layout)) + "}",
            insert_sql(tuple(names)),
            metadata,
        )


def _picker(positions: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """``itemgetter(*positions)`` that always returns a tuple."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    return lambda values: tuple(values[position] for position in positions)


class ChainCheck(NamedTuple):
    rows: int  # rows checked before the first break (all of them when ok)
    anchor: str  # where the walk started: GENESIS, a retention anchor, a range's or checkpoint's link
    broken_id: int | None = None
    broken_exchange_id: str | None = None
    reason: str | None = None
    head: str | None = None  # the last verified row's hash as shown (the anchor when none)
    last_id: int | None = None  # the last verified row's id

    @property
    def ok(self) -> bool:
        return self.broken_id is None


class Link(NamedTuple):
    """What verify reads of a stored row: its chain links and its body's canonical JSON."""

    id: int
    exchange_id: str
    prev_hash: Any  # bytes (lean) or text (old rows), as stored
    row_hash: Any
    body: str


#: Rows between two ``tick`` calls of ``walk_chain``.
TICK_ROWS = 10_000


def walk_chain(
    links: Iterable[Link], anchor: bytes | str, tick: Callable[[ChainCheck], None] | None = None
) -> ChainCheck:
    """Check ``links`` (in id order) as a chain starting from ``anchor``; stop at the first row
    that does not follow. Holds one row at a time; ``tick`` gets the state every ``TICK_ROWS``."""
    prev, shown = as_digest(anchor), as_hex(anchor)
    checked, last_id = 0, None
    for link in links:
        reason = link_fault(prev, link.prev_hash, link.row_hash, link.body)
        if reason:
            return ChainCheck(checked, shown, link.id, link.exchange_id, reason, as_hex(prev), last_id)
        prev, checked, last_id = as_digest(link.row_hash), checked + 1, link.id
        if tick is not None and checked % TICK_ROWS == 0:
            tick(ChainCheck(checked, shown, head=as_hex(prev), last_id=last_id))
    return ChainCheck(checked, shown, head=as_hex(prev), last_id=last_id)


def read_record(line: bytes) -> tuple[dict[str, Any], bool]:
    """A journal line's record, and whether it is clean: no string in it can hold a lone
    surrogate (``RowBuilder``'s fast path needs that). ``ValueError`` if the line is no record."""
    text = None  # the line as UTF-8 text (json.loads reads such bytes so too), when it is
    if line[:2] == b'{"':
        try:
            text = line.decode()
        except UnicodeDecodeError:
            pass
    try:  # orjson when it can (most lines; 2-3x faster); json.loads for what orjson refuses and
        # the journal may hold: NaN, integers beyond 64 bits, escaped lone surrogates
        data = orjson.loads(line)
    except ValueError:
        data = json.loads(line if text is None else text)
    if not isinstance(data, dict) or not isinstance(data.get("exchange_id"), str):
        raise ValueError("not a journaled record")
    # no raw surrogate in valid UTF-8, and none escaped without a \u (a backslash is rare, and
    # far quicker to look for)
    return data, text is not None and ("\\" not in text or "\\u" not in text)


@functools.lru_cache(maxsize=256)
def insert_sql(names: tuple[str, ...]) -> str:
    """The INSERT of a row whose other columns are NULL (sqlite3 binds a None ten times slower
    than a number); ``?`` placeholders. The PostgreSQL store reads the column list from it."""
    columns = [*names, "prev_hash", "row_hash"]
    return f"INSERT OR IGNORE INTO exchanges ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


@functools.lru_cache(maxsize=256)
def insert_columns(sql: str) -> tuple[str, ...]:
    """The non-NULL columns of an ``insert_sql`` (prev_hash and row_hash left out)."""
    return tuple(name.strip() for name in sql[sql.index("(") + 1 : sql.index(")")].split(","))[:-2]


#: Public name of the body's canonical JSON, which the stores hash and verify.
body_json = _body_json


def content_row(data: Mapping[str, Any], capture_content: bool) -> tuple[str, str | None, str | None, int] | None:
    """The ``content`` row of a journaled record, only when capture is on and it carries text.

    The parser already capped it (``llmtap_content_max_chars`` per direction) and marked each
    cut message ``truncated``.
    """
    inputs, outputs = data.get("input_messages"), data.get("output_messages")
    if not capture_content or not (inputs or outputs):
        return None
    truncated = any(isinstance(m, Mapping) and m.get("truncated") for m in [*(inputs or ()), *(outputs or ())])
    texts = [None if messages is None else _text(canonical_json(messages)) for messages in (inputs, outputs)]
    return data["exchange_id"], texts[0], texts[1], int(truncated)
