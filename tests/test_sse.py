"""The incremental SSE and content decoders, fed bodies split at every possible byte."""

from __future__ import annotations

import gzip
import zlib

import brotli
import pytest
import zstandard

from llmtap.capture.decoding import incremental_decoder
from llmtap.protocols.sse import SSEDecoder

STREAM = (
    b": keep-alive comment\n"
    b'data: {"a": 1}\n\n'
    b"event: message\r\n"
    b'data:{"b": 2}\r\n\r\n'
    b"data: line one\n"
    b"data: line two\n\n"
    b"id: 7\rdata: cr-only\r\r"
    b"data: [DONE]\n\n"
)
EXPECTED = [b'{"a": 1}', b'{"b": 2}', b"line one\nline two", b"cr-only", b"[DONE]"]


def decode_in_pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    decoder, events, last = SSEDecoder(), [], 0
    for cut in [*cuts, len(data)]:
        events += decoder.feed(data[last:cut])
        last = cut
    return events + decoder.flush()


def test_whole_stream_at_once() -> None:
    assert decode_in_pieces(STREAM, []) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_split_at_every_byte(cut: int) -> None:
    assert decode_in_pieces(STREAM, [cut]) == EXPECTED


def test_one_byte_at_a_time() -> None:
    assert decode_in_pieces(STREAM, list(range(1, len(STREAM)))) == EXPECTED


def test_crlf_split_between_chunks_counts_once() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    assert decoder.feed(b"\n\r") == [b"x"]
    assert decoder.feed(b"\ndata: y\n\n") == [b"y"]


def test_unterminated_last_event_is_flushed() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"z": 1}') == []
    assert decoder.flush() == [b'{"z": 1}']


def _deflate_raw(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(
    "encoding, encode",
    [
        ("identity", lambda b: b),
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", _deflate_raw),
        ("br", brotli.compress),
        ("zstd", lambda b: zstandard.ZstdCompressor().compress(b)),
    ],
)
def test_incremental_content_decoding(encoding: str, encode) -> None:
    encoded = encode(STREAM * 3)
    decode = incremental_decoder(encoding)
    out = b"".join(decode(encoded[i : i + 7]) for i in range(0, len(encoded), 7))
    assert out == STREAM * 3


def test_unknown_encoding_is_reported_not_guessed() -> None:
    assert incremental_decoder("compress") is None
