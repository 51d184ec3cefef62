"""Content decoding of bodies, piece by piece, with bounded work: the proxy's chunks split anywhere.

What the decoded bytes mean (SSE events, JSON) is each protocol family's business
(``llmtap.protocols``); this module only undoes the ``Content-Encoding``, and never all at
once: a 2 MB gzip body can inflate to gigabytes (a decompression bomb), so each call yields
decoded pieces of at most ``PIECE_BYTES`` to a callback, which says when to stop.

- gzip/deflate: ``zlib`` with ``max_length`` and ``unconsumed_tail``;
- zstd: ``zstandard``'s stream writer, which hands its output on in ``PIECE_BYTES`` pieces;
- br: the ``brotli`` binding (1.1) has no output limit, so the input is fed in slices of
  ``BROTLI_SLICE`` bytes; one slice's output is bounded by brotli's format (a meta-block
  holds at most 16 MiB), so one call holds at most that, and the callback stops the rest.

``incremental_decoder`` (whole output per call) is kept for callers that want it unbounded.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

#: The largest decoded piece handed on at once.
PIECE_BYTES = 256 * 1024
BROTLI_SLICE = 1024

#: Receives each decoded piece; returns False to stop decoding (the rest is not read).
Emit = Callable[[bytes], bool]


class DecodeStopped(Exception):
    """The callback asked to stop."""


class BoundedDecoder:
    """Decodes one body, chunk by chunk, into pieces of at most ``PIECE_BYTES``."""

    def feed(self, chunk: bytes, emit: Emit) -> bool:
        """Decode ``chunk``; False once ``emit`` asked to stop (then call no more)."""
        raise NotImplementedError

    def finish(self, emit: Emit) -> bool:
        return True


class _Identity(BoundedDecoder):
    def feed(self, chunk: bytes, emit: Emit) -> bool:
        if len(chunk) <= PIECE_BYTES:
            return emit(chunk) if chunk else True
        view = memoryview(chunk)
        return all(emit(bytes(view[start : start + PIECE_BYTES])) for start in range(0, len(chunk), PIECE_BYTES))


class _Zlib(BoundedDecoder):
    def __init__(self, wbits: int, *, deflate: bool = False) -> None:
        self._inner = zlib.decompressobj(wbits)
        self._sniff = deflate  # HTTP "deflate" is zlib-wrapped by the spec, raw deflate in the wild

    def feed(self, chunk: bytes, emit: Emit) -> bool:
        if self._sniff and chunk:
            self._sniff = False
            try:
                probe = zlib.decompressobj()
                probe.decompress(chunk[:2])
            except zlib.error:
                self._inner = zlib.decompressobj(-zlib.MAX_WBITS)
        data = chunk
        while data:
            piece = self._inner.decompress(data, PIECE_BYTES)
            data = self._inner.unconsumed_tail
            if piece and not emit(piece):
                return False
            if self._inner.eof:
                return True
        return True

    def finish(self, emit: Emit) -> bool:
        piece = self._inner.flush(PIECE_BYTES) if not self._inner.eof else b""
        return emit(piece) if piece else True


class _Brotli(BoundedDecoder):
    def __init__(self) -> None:
        import brotli

        self._inner = brotli.Decompressor()

    def feed(self, chunk: bytes, emit: Emit) -> bool:
        view = memoryview(chunk)
        for start in range(0, len(chunk), BROTLI_SLICE):
            piece = self._inner.process(bytes(view[start : start + BROTLI_SLICE]))
            for offset in range(0, len(piece), PIECE_BYTES):
                if not emit(piece[offset : offset + PIECE_BYTES]):
                    return False
        return True


class _Sink:
    """zstandard's stream writer writes its output here, in pieces of ``PIECE_BYTES``."""

    def __init__(self) -> None:
        self.emit: Emit | None = None

    def write(self, data: bytes) -> int:
        if not self.emit(bytes(data)):
            raise DecodeStopped
        return len(data)


class _Zstd(BoundedDecoder):
    def __init__(self) -> None:
        import zstandard

        self._sink = _Sink()
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            self._sink, write_size=PIECE_BYTES, write_return_read=True
        )

    def feed(self, chunk: bytes, emit: Emit) -> bool:
        self._sink.emit = emit
        try:
            self._writer.write(chunk)
        except DecodeStopped:
            return False
        return True


def bounded_decoder(content_encoding: str | None) -> BoundedDecoder | None:
    """A ``BoundedDecoder`` for a ``Content-Encoding``; None if unsupported."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("identity", ""):
        return _Identity()
    if encoding in ("gzip", "x-gzip"):
        return _Zlib(zlib.MAX_WBITS | 16)
    if encoding == "deflate":
        return _Zlib(zlib.MAX_WBITS, deflate=True)
    if encoding == "br":
        return _Brotli()
    if encoding == "zstd":
        return _Zstd()
    return None


def incremental_decoder(content_encoding: str | None) -> Callable[[bytes], bytes] | None:
    """A function that decodes a content-encoded body piece by piece; ``None`` if unsupported.

    Unbounded (each call returns all its output); identity encoding returns the chunk itself.
    """
    decoder = bounded_decoder(content_encoding)
    if decoder is None:
        return None
    if isinstance(decoder, _Identity):
        return lambda chunk: chunk

    def decode(chunk: bytes) -> bytes:
        out: list[bytes] = []
        decoder.feed(chunk, lambda piece: out.append(piece) or True)
        return b"".join(out)

    return decode
