"""Content decoding of streamed bodies, piece by piece: the proxy's chunks split anywhere.

What the decoded bytes mean (SSE events, JSON arrays) is each protocol family's business
(``llmtap.protocols``); this module only undoes the ``Content-Encoding``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable


def incremental_decoder(content_encoding: str | None) -> Callable[[bytes], bytes] | None:
    """A function that decodes a content-encoded body piece by piece; ``None`` if unsupported.

    Identity encoding returns the chunk itself (no copy).
    """
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("identity", ""):
        return lambda chunk: chunk
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(zlib.MAX_WBITS | 16).decompress
    if encoding == "deflate":
        return _DeflateDecoder().decode
    if encoding == "br":
        import brotli

        return brotli.Decompressor().process
    if encoding == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress
    return None


class _DeflateDecoder:
    """HTTP "deflate" is zlib-wrapped by the spec but raw deflate in the wild; try both."""

    def __init__(self) -> None:
        self._inner = zlib.decompressobj()
        self._first = True

    def decode(self, chunk: bytes) -> bytes:
        if self._first and chunk:
            self._first = False
            try:
                return self._inner.decompress(chunk)
            except zlib.error:
                self._inner = zlib.decompressobj(-zlib.MAX_WBITS)
        return self._inner.decompress(chunk)
