"""Content-encodings the simulator can send (``X-Sim-Encoding``), whole bodies and streams."""

from __future__ import annotations

import zlib
from typing import Any

try:
    import brotli
except ImportError:  # optional: only needed for X-Sim-Encoding: br
    brotli = None
try:
    import zstandard
except ImportError:  # optional: only needed for X-Sim-Encoding: zstd
    zstandard = None


class Encoder:
    """Content-encoder that can flush after every SSE event so streams stay incremental."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        if coding in ("gzip", "deflate"):
            self._c: Any = zlib.compressobj(wbits=31 if coding == "gzip" else 15)
        elif coding == "br":
            self._c = brotli.Compressor()
        else:
            self._c = zstandard.ZstdCompressor().compressobj()

    def chunk(self, data: bytes) -> bytes:
        if self.coding == "br":
            return self._c.process(data) + self._c.flush()
        if self.coding == "zstd":
            return self._c.compress(data) + self._c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        return self._c.compress(data) + self._c.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._c.finish() if self.coding == "br" else self._c.flush()


def encode_body(coding: str, data: bytes) -> bytes:
    """One-shot content-encoding of a whole body (zstd frames then carry their content size)."""
    if coding == "gzip":
        return zlib.compress(data, wbits=31)
    if coding == "deflate":
        return zlib.compress(data)
    if coding == "br":
        return brotli.compress(data)
    return zstandard.ZstdCompressor().compress(data)


ENCODINGS = tuple(c for c, ok in (("gzip", 1), ("deflate", 1), ("br", brotli), ("zstd", zstandard)) if ok)


def coding_of(headers: dict[str, str]) -> str | None:
    """The supported content-coding asked for by ``X-Sim-Encoding``, if any."""
    coding = headers.get("x-sim-encoding", "").lower()
    return coding if coding in ENCODINGS else None
