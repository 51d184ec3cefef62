"""The one immutable record of an LLM exchange: the only thing sinks ever see.

Times are Unix epoch seconds (floats). Money is USD. ``None`` always means "not known"
(never a silent zero): a sink must keep the difference between ``None`` and ``0``.

Serialisation is canonical JSON (sorted keys, compact separators, UTF-8): the journal,
the JSON-lines export and the audit hash chain all depend on ``to_json`` being stable.

Tokens have one meaning whatever the family (record schema 2; each family converts to it):

- ``input_tokens``: every input token, cache reads and cache writes included;
- ``cached_input_tokens``: the part of ``input_tokens`` read from a prompt cache;
- ``cache_write_input_tokens``: the part of ``input_tokens`` written to a prompt cache
  (``cache_write_1h_input_tokens``: of those, the ones kept for an hour);
- ``output_tokens``: every generated token, reasoning included;
- ``reasoning_tokens``: the part of ``output_tokens`` spent reasoning (thinking).

Per family (upstream field → record field):

- chat_completions: ``prompt_tokens`` → input; ``prompt_tokens_details.cached_tokens`` /
  ``.cache_write_tokens`` → cached / cache writes; ``completion_tokens`` → output;
  ``completion_tokens_details.reasoning_tokens`` → reasoning.
- openai_responses (and Azure): ``input_tokens``, ``input_tokens_details.cached_tokens`` /
  ``.cache_write_tokens``, ``output_tokens``, ``output_tokens_details.reasoning_tokens``.
- embeddings: ``usage.prompt_tokens`` → input; output is 0.
- anthropic_messages: input = ``input_tokens`` + ``cache_read_input_tokens`` +
  ``cache_creation_input_tokens`` (Anthropic's ``input_tokens`` excludes the cache);
  ``cache_creation.ephemeral_1h_input_tokens`` → the 1-hour writes.
- gemini: ``promptTokenCount`` → input (it includes ``cachedContentTokenCount`` → cached);
  output = ``candidatesTokenCount`` + ``thoughtsTokenCount`` (Gemini's candidates exclude the
  thoughts); ``thoughtsTokenCount`` → reasoning.

Rows whose ``record_schema`` is None were written before schemas were numbered (schema 1): for
Chat Completions the meaning is the same; see CHANGELOG.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from json.encoder import c_encode_basestring, c_make_encoder
from typing import Any

#: The version of the record's meaning that this code writes; see CHANGELOG.md for each change.
#: 1 (rows that carry none): before protocol families; 2: protocol families, one token meaning.
RECORD_SCHEMA = 2


@dataclass(frozen=True, slots=True)
class ExchangeRecord:
    """Everything llmtap learned about one request/response pair."""

    exchange_id: str
    operation: str  # "chat" | "text_completion" | "embeddings"
    method: str
    path: str

    # --- timing (epoch seconds) ---
    request_start: float
    request_end: float | None = None
    response_start: float | None = None  # first byte of the response headers
    first_token_at: float | None = None  # first chunk carrying content (streams)
    response_end: float | None = None
    upstream_latency_s: float | None = None  # metadata.latency: the provider's own time

    # --- where ---
    client_address: str | None = None
    upstream_scheme: str | None = None
    upstream_host: str | None = None
    upstream_port: int | None = None
    family: str | None = None  # the protocol family that read it (llmtap.protocols.registry)
    router: str | None = None  # "pulze" when a Pulze router answered, else None
    provider: str | None = None  # who served it: metadata.model.provider, or from the model/host
    http_status: int | None = None
    error_type: str | None = None  # None on success; e.g. "http_429", "client_disconnected"
    error_message: str | None = None
    parse_problem: str | None = None  # why part of the exchange was not read (the bytes passed anyway)
    stream: bool = False

    # --- who ---
    key_fingerprint: str | None = None  # keyed hash prefix of the API key, never the key
    app_id: str | None = None
    labels: Mapping[str, str] | None = None  # Pulze-Labels request header
    weights: Mapping[str, Any] | None = None  # Pulze-Weights request header
    policies: Mapping[str, Any] | None = None  # Pulze-Policies request header
    traceparent: str | None = None  # the app's incoming W3C trace context, verbatim
    trace_id: str | None = None  # 32 hex: the app's trace if it sent one, else a new one
    span_id: str | None = None  # 16 hex: llmtap's own span for this exchange, chosen up front

    # --- request parameters ---
    request_model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    best_of: int | None = None
    stop: tuple[str, ...] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: int | None = None
    seed: int | None = None
    tool_count: int | None = None
    tool_names: tuple[str, ...] | None = None
    tool_choice: str | None = None
    response_format: str | None = None
    logit_bias: bool | None = None  # present in the request (values are not kept)
    service_tier: str | None = None  # as the response says (else as requested): flex, priority, …
    tool_types: tuple[str, ...] | None = None  # each tool's type ("function", "web_search", …)
    previous_response_id: str | None = None  # OpenAI Responses: the conversation join key
    conversation_id: str | None = None  # OpenAI Responses ``conversation``
    background: bool | None = None  # OpenAI Responses background mode (billed by a later GET)
    api_version: str | None = (
        None  # the API version the request asked for (Azure ``api-version``, ``anthropic-version``)
    )
    input_count: int | None = None  # embeddings: inputs embedded
    dimensions: int | None = None  # embeddings: length of the vectors returned (else requested)

    # --- response ---
    response_id: str | None = None
    response_object: str | None = None
    response_status: str | None = None  # OpenAI Responses ``status`` (completed, incomplete, queued, …)
    created_at: float | None = None  # Pulze `created` is in milliseconds; converted here
    response_model: str | None = None  # top-level `model`: who actually served
    served_model: str | None = None  # metadata.model.model
    served_provider: str | None = None  # metadata.model.provider
    served_owner: str | None = None  # metadata.model.owner
    served_namespace: str | None = None  # metadata.model.namespace ("provider/model")
    served_at: str | None = None  # metadata.model.at
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cached_input_tokens: int | None = None  # of input_tokens, read from a prompt cache
    cache_write_input_tokens: int | None = None  # of input_tokens, written to a prompt cache
    cache_write_1h_input_tokens: int | None = None  # of the cache writes, those kept for one hour
    reasoning_tokens: int | None = None
    finish_reasons: tuple[str, ...] | None = None
    choice_count: int | None = None
    chunk_count: int | None = None  # content-carrying SSE events (streams only)

    # --- money (USD) ---
    # cost_nanousd is the exact amount, integer nano-dollars (1e-9 USD); cost_usd the same as
    # the nearest float. cost_source: reported | user | database | unknown ("computed" on rows
    # of llmtap's former built-in table). price_version: the data priced from
    # ("genai-prices:0.0.61", "genai-prices-data:<sha256>", "user:<sha256>");
    # price_model: the entry matched ("openai/gpt-4o", or the --prices file's model key).
    cost_usd: float | None = None
    cost_prompt_usd: float | None = None
    cost_completion_usd: float | None = None
    cost_source: str = "unknown"
    cost_nanousd: int | None = None
    price_version: str | None = None
    price_model: str | None = None
    cost_savings_usd: float | None = None
    cost_savings_prompt_usd: float | None = None
    cost_savings_completion_usd: float | None = None
    #: numbers that were not used (negative, not finite, above a ceiling): field -> "raw: why"
    anomalies: Mapping[str, str] | None = None

    # --- Pulze metadata ---
    retries: int | None = None
    upstream_status_code: int | None = None  # metadata.status_code: the provider's status
    score: float | None = None
    best_model: str | None = None
    candidate_count: int | None = None
    response_labels: Mapping[str, str] | None = None  # metadata.labels
    warning: str | None = None
    upstream_error: str | None = None  # metadata.error
    category: str | None = None
    metadata: Mapping[str, Any] | None = None  # the raw metadata object, kept whole

    # --- content: only ever filled when the user opted in (--capture-content) ---
    # [{"role": ..., "content": ...}]; completions' prompt is one "user" message; each content
    # is capped at llmtap_content_max_chars. Output messages also carry "finish_reason".
    input_messages: tuple[Mapping[str, Any], ...] | None = None
    output_messages: tuple[Mapping[str, Any], ...] | None = None

    # which version of this record's meaning wrote it (``RECORD_SCHEMA``); None: before versioning (1)
    record_schema: int | None = None

    # the canonical JSON, made once on first use: several sinks write the same line
    _json: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def duration_s(self) -> float | None:
        """Total time from the first request byte to the last response byte."""
        end = self.response_end
        return None if end is None else max(0.0, end - self.request_start)

    @property
    def time_to_first_token_s(self) -> float | None:
        if self.first_token_at is None:
            return None
        return max(0.0, self.first_token_at - self.request_start)

    @property
    def time_to_first_byte_s(self) -> float | None:
        if self.response_start is None:
            return None
        return max(0.0, self.response_start - self.request_start)

    @property
    def ok(self) -> bool:
        return self.error_type is None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        return {name: _plain(getattr(self, name)) for name in FIELD_NAMES}

    def to_json(self) -> str:
        """``canonical_json`` of ``to_dict()``, byte for byte, at a fraction of its cost.

        The keys are fixed, so they are laid out once, sorted, in ``_RECORD_TEMPLATE``; most
        values are None or a plain scalar, written here exactly as the JSON encoder writes them
        (``repr`` of an int or finite float, ``c_encode_basestring`` of a str), without a call to it.
        """
        if self._json is None:
            line = _RECORD_TEMPLATE % tuple(
                [
                    "null"
                    if value is None
                    else c_encode_basestring(value)
                    if type(value) is str
                    else repr(value)
                    if type(value) is int or (type(value) is float and math.isfinite(value))
                    else canonical_json(value)  # bool, containers, NaN/inf (as null), subclasses
                    for value in _sorted_field_values(self)
                ]
            )
            object.__setattr__(self, "_json", line)
        return self._json

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> ExchangeRecord:
        """A record of ``fields``: other keys are ignored, missing fields take their defaults.

        The values are passed in order, by position: binding some 110 keyword arguments by
        name is a quarter of the cost of making a record.
        """
        return cls(*_values_in_field_order(_FIELD_DEFAULTS | fields))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExchangeRecord:
        """Inverse of ``to_dict``; unknown keys (from a newer llmtap) are ignored."""
        kwargs = {}
        for name in FIELD_NAMES:
            if name in data:
                value = data[name]
                kwargs[name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, line: str | bytes) -> ExchangeRecord:
        return cls.from_dict(json.loads(line))

    def replace(self, **changes: Any) -> ExchangeRecord:
        return dataclasses.replace(self, **changes)


def canonical_json(value: Any) -> str:
    """The llmtap JSON contract: sorted keys, no spaces, UTF-8 kept as-is, strict JSON.

    JSON has no NaN or infinity (Python's parser accepts them, and ``1e999`` parses to inf):
    such a value, at any depth, is written as ``null``.
    """
    try:
        return "".join(_encode_canonical(value, 0))
    except ValueError:  # a non-finite float somewhere inside
        return "".join(_encode_canonical(_finite(value), 0))


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _plain_mapping(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# What ``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
# default=_plain_mapping)`` runs, built once: json.dumps builds a JSONEncoder and this C encoder
# on every call. No circular check (parsed JSON cannot be circular), so it keeps no state
# between calls and threads can share it.
_encode_canonical = c_make_encoder(
    None, _plain_mapping, c_encode_basestring, None, ":", ",", True, False, False
)  # markers, default, encoder, indent, key/item separators, sort_keys, skipkeys, allow_nan


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ExchangeRecord) if f.init)

_FIELD_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(ExchangeRecord) if f.init and f.default is not dataclasses.MISSING
}
_values_in_field_order = operator.itemgetter(*FIELD_NAMES)

_sorted_field_values = operator.attrgetter(*sorted(FIELD_NAMES))
#: The record's canonical JSON with a ``%s`` for each value, keys in sorted order.
_RECORD_TEMPLATE = "{" + ",".join(f"{c_encode_basestring(name)}:%s" for name in sorted(FIELD_NAMES)) + "}"
