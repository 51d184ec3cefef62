"""Property tests: every parser, the SSE framing and the content decoders, fed hostile input.

Random and mutated bodies and streams, split anywhere, invalid UTF-8, wrong types everywhere,
huge and non-finite numbers. Two properties throughout: no exception escapes, and no negative
or non-finite value reaches spend (after the finishing step every record goes through). The
``ci`` profile (tests/conftest.py) makes the runs derandomized and bounded.
"""

from __future__ import annotations

import json
import zlib

from hypothesis import given
from hypothesis import strategies as st

from llmtap.capture.bodies import read_body
from llmtap.capture.decoding import PIECE_BYTES, bounded_decoder
from llmtap.devtools.hostile import encode
from llmtap.pricing.cost import Pricer, resolve_cost
from llmtap.pricing.validity import SPEND_FIELDS, TOKEN_FIELDS, spend_amount
from llmtap.protocols import registry
from llmtap.protocols.jsonscan import TopLevelScanner
from llmtap.protocols.sse import SSEDecoder
from llmtap.protocols.values import load_json
from llmtap.record import ExchangeRecord

PRICES = Pricer.load()
KEYS = [
    "id", "object", "model", "created", "usage", "prompt_tokens", "completion_tokens", "total_tokens",
    "prompt_tokens_details", "cached_tokens", "completion_tokens_details", "reasoning_tokens", "choices",
    "index", "delta", "message", "content", "text", "finish_reason", "metadata", "costs", "cost_savings",
    "latency", "retries", "score", "scores", "labels", "model", "namespace", "provider", "error", "detail",
    "loc", "msg", "type", "input_tokens", "output_tokens", "cache_read_input_tokens",
    "cache_creation_input_tokens", "cache_creation", "usageMetadata", "promptTokenCount",
    "candidatesTokenCount", "thoughtsTokenCount", "totalTokenCount", "candidates", "parts", "stop_reason",
    "messages", "role", "tools", "stream", "max_tokens", "temperature", "n", "service_tier",
]  # fmt: skip
NUMBERS = st.one_of(
    st.integers(),
    st.sampled_from([-1, 0, 10**8 + 1, 10**30, -(10**30), 10**400, -(10**400), 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 1.7e308, 5e-324, -0.0]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=20))
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=8),
    ),
    max_leaves=40,
)
BODIES = st.dictionaries(st.sampled_from(KEYS), JSON, max_size=10)
PATHS = {
    "chat_completions": "/v1/chat/completions",
    "anthropic_messages": "/v1/messages",
    "gemini": "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
}


def dumps(value) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity literals included, as hostile upstreams send


def mutate(data: bytes, cut: int, junk: bytes) -> bytes:
    at = cut % (len(data) + 1)
    return data[:at] + junk + data[at + len(junk) :]


def assert_spend_clean(fields: dict) -> None:
    """The finishing step every record goes through; then nothing absurd is spend."""
    fields = {**fields, **resolve_cost(fields, PRICES)}
    for name in (*TOKEN_FIELDS, *SPEND_FIELDS, "cost_usd"):
        value = fields.get(name)
        assert value is None or spend_amount(value) == value, (name, value)
    for name in TOKEN_FIELDS:
        assert fields.get(name) is None or isinstance(fields[name], int)
    record = ExchangeRecord.from_fields(
        {"exchange_id": "x", "operation": "chat", "method": "POST", "path": "/", "request_start": 1.0, **fields}
    )
    json.loads(record.to_json(), parse_constant=lambda name: (_ for _ in ()).throw(AssertionError(name)))


def split_points(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


@given(body=st.one_of(BODIES, JSON), request=st.one_of(BODIES, JSON), cap=st.sampled_from([None, 0, 50]))
def test_every_family_reads_any_body_without_raising_and_spend_stays_clean(body, request, cap) -> None:
    for family in registry.FAMILIES:
        path = PATHS.get(family.name, "/v1/chat/completions")
        fields = family.request_fields(request, "chat", path, "key=abc", cap)
        fields.update(family.response_fields(body, cap))
        fields.update(family.error_fields(body, dumps(body)))
        fields["upstream_host"] = "api.pulze.ai"
        registry.finish(fields, family, body, cap is not None)
        assert_spend_clean(fields)


@given(body=JSON, cut=st.integers(0, 10**6), junk=st.binary(max_size=8))
def test_load_json_and_error_texts_take_any_bytes(body, cut, junk) -> None:
    raw = mutate(dumps(body), cut, junk)
    parsed = load_json(raw)
    for family in registry.FAMILIES:
        message = family.error_fields(parsed, raw).get("error_message")
        assert message is None or isinstance(message, str)


@given(
    events=st.lists(st.one_of(BODIES, JSON), max_size=8),
    cuts=st.lists(st.integers(0, 10**6), max_size=6),
    cut=st.integers(0, 10**6),
    junk=st.binary(max_size=6),
    line_end=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    cap=st.sampled_from([None, 40]),
)
def test_every_stream_parser_takes_any_stream_split_anywhere(events, cuts, cut, junk, line_end, cap) -> None:
    sse = b"".join(b"data: " + dumps(e) + line_end + line_end for e in events) + b"data: [DONE]" + line_end * 2
    array = b"[" + b",\r\n".join(dumps(e) for e in events) + b"]"
    for family in registry.FAMILIES:
        for content_type, stream in (("text/event-stream", sse), ("application/json", array)):
            parser = family.stream_parser(cap, content_type)
            parser.bound(4096)
            for piece in split_points(mutate(stream, cut, junk), cuts):
                parser.feed(piece)
            parser.close()
            fields = parser.fields()
            registry.finish(fields, family, parser.overlay_body(), cap is not None)
            assert_spend_clean(fields)


@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 10**6), max_size=8), bound=st.integers(8, 64))
def test_sse_framing_takes_any_bytes_and_splitting_never_changes_events(data, cuts, bound) -> None:
    whole = SSEDecoder()
    expected = whole.feed(data) + whole.flush()
    split = SSEDecoder()
    got = [event for piece in split_points(data, cuts) for event in split.feed(piece)] + split.flush()
    assert got == expected
    bounded = SSEDecoder(max_line=bound)
    events = [event for piece in split_points(data, cuts) for event in bounded.feed(piece)] + bounded.flush()
    assert all(len(event) <= bound for event in events)


@given(
    data=st.binary(max_size=3000)
    | st.builds(lambda n, b: b * n, st.integers(0, 200_000), st.binary(min_size=1, max_size=3)),
    encoding=st.sampled_from(["gzip", "br", "zstd", "deflate", "identity"]),
    cuts=st.lists(st.integers(0, 10**6), max_size=6),
)
def test_content_decoders_split_anywhere_give_the_body_back_in_bounded_pieces(data, encoding, cuts) -> None:
    encoded = zlib.compress(data) if encoding == "deflate" else encode(encoding, data)
    decoder = bounded_decoder(encoding)
    out: list[bytes] = []
    for piece in split_points(encoded, cuts):
        decoder.feed(piece, lambda p: out.append(p) or True)
    decoder.finish(lambda p: out.append(p) or True)
    assert b"".join(out) == data
    assert all(len(p) <= PIECE_BYTES for p in out)


@given(
    data=st.binary(max_size=2000),
    encoding=st.sampled_from(["gzip", "br", "zstd", "deflate", "identity", "compress", None]),
    scan=st.integers(4096, 1 << 20),
)
def test_read_body_never_raises_on_any_bytes_and_respects_the_scan_bound(data, encoding, scan) -> None:
    body = read_body(data, encoding, 4096, scan)
    assert body.scanned <= scan
    assert len(body.head) <= 2048


@given(value=st.dictionaries(st.text(max_size=6), JSON, max_size=8), cuts=st.lists(st.integers(0, 10**6), max_size=8))
def test_top_level_scanner_equals_the_parser_split_anywhere(value, cuts) -> None:
    raw = json.dumps(value, indent=None if len(cuts) % 2 else 1).encode()
    scanner = TopLevelScanner(1 << 20, 1 << 22)
    for piece in split_points(raw, cuts):
        scanner.feed(piece)
    expected = json.loads(raw)
    members = scanner.members()
    assert scanner.complete
    assert json.dumps(members, sort_keys=True) == json.dumps(expected, sort_keys=True)


@given(data=st.binary(max_size=500), cuts=st.lists(st.integers(0, 10**6), max_size=6), cap=st.integers(1, 64))
def test_top_level_scanner_takes_any_bytes_and_keeps_within_its_caps(data, cuts, cap) -> None:
    scanner = TopLevelScanner(cap, cap * 2)
    for piece in split_points(b"{" + data, cuts):
        scanner.feed(piece)
    assert sum(map(len, scanner.members_raw.values())) <= cap * 2
    members = scanner.members()
    assert members is None or isinstance(members, dict)
