"""A complete (non-streamed) response body, read with bounded memory and work.

``read_body`` decodes the body piece by piece (``llmtap.capture.decoding``) and never holds it
whole when it is large: a body up to ``WHOLE_PARSE_BYTES`` decoded is parsed as usual; past
that, ``TopLevelScanner`` keeps only the top-level members a record needs (each at most a
quarter of ``--parse-memory-bytes``), so an 8 MB embeddings body still yields the ``usage`` it
carries last. Past ``--parse-scan-bytes`` decoded bytes (a decompression bomb) reading stops:
what was read so far counts, and ``problem`` says why the rest was not.

The work is bounded by those options; the addon runs it off the event loop for any body that
is large or content-encoded (``needs_thread``), so no other client waits on it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from llmtap.capture.decoding import bounded_decoder
from llmtap.protocols.jsonscan import TopLevelScanner
from llmtap.protocols.values import load_json

#: Decoded bodies up to this size are parsed whole (the C parser; the common case).
WHOLE_PARSE_BYTES = 1 << 20
#: What error texts are read from (``errors.error_message`` looks at 2 KB at most).
HEAD_BYTES = 2048
#: Identity bodies up to this size are read on the event loop (microseconds).
INLINE_BYTES = 256 * 1024


class Body(NamedTuple):
    value: Any  # the parsed JSON (for a large body, the dict of its kept top-level members)
    head: bytes  # the first HEAD_BYTES decoded bytes (error texts)
    problem: str | None  # why the body was not read in full, if it was not
    scanned: int  # decoded bytes read


def needs_thread(raw: bytes, content_encoding: str | None) -> bool:
    """Whether reading this body could take long enough to stall the event loop."""
    encoding = (content_encoding or "").strip().lower()
    return len(raw) > INLINE_BYTES or encoding not in ("", "identity")


def read_body(raw: bytes, content_encoding: str | None, memory_bytes: int, scan_bytes: int) -> Body:
    """Never raises."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity") and len(raw) <= min(WHOLE_PARSE_BYTES, scan_bytes):
        return Body(load_json(raw), raw[:HEAD_BYTES], None, len(raw))
    decoder = bounded_decoder(content_encoding)
    if decoder is None:  # as mitmproxy's get_content(strict=False): the bytes as they came
        decoder = bounded_decoder(None)
        unsupported = f"unsupported content-encoding {content_encoding!r}"
    else:
        unsupported = None
    state = _Reading(memory_bytes, scan_bytes)
    try:
        if decoder.feed(raw, state.emit):
            decoder.finish(state.emit)
    except Exception as exc:  # corrupt encoding: what was decoded so far counts
        if state.scanned == 0:
            state = _Reading(memory_bytes, scan_bytes)
            bounded_decoder(None).feed(raw, state.emit)
        state.problem = state.problem or f"content decoding failed: {type(exc).__name__}"
    return state.result(unsupported)


class _Reading:
    def __init__(self, memory_bytes: int, scan_bytes: int) -> None:
        self.memory_bytes = memory_bytes
        self.scan_bytes = scan_bytes
        self.buffer: list[bytes] | None = []
        self.buffered = 0
        self.scanner: TopLevelScanner | None = None
        self.head = b""
        self.scanned = 0
        self.problem: str | None = None

    def emit(self, piece: bytes) -> bool:
        if self.scanned + len(piece) > self.scan_bytes:
            piece = piece[: self.scan_bytes - self.scanned]
            self.problem = f"scan bound: stopped after {self.scan_bytes} decoded bytes"
        self.scanned += len(piece)
        if len(self.head) < HEAD_BYTES:
            self.head += piece[: HEAD_BYTES - len(self.head)]
        if self.scanner is None:
            self.buffer.append(piece)
            self.buffered += len(piece)
            if self.buffered > min(WHOLE_PARSE_BYTES, self.memory_bytes):
                self.scanner = TopLevelScanner(max(1, self.memory_bytes // 4), self.memory_bytes)
                for part in self.buffer:
                    self.scanner.feed(part)
                self.buffer = None
        else:
            self.scanner.feed(piece)
        return self.problem is None

    def result(self, unsupported: str | None) -> Body:
        problem = unsupported or self.problem
        if self.scanner is None:
            return Body(load_json(b"".join(self.buffer)), self.head, problem, self.scanned)
        # a member too large to keep (an embeddings body's ``data``) is simply absent: the
        # record reads what it needs from the others
        return Body(self.scanner.members(), self.head, problem, self.scanned)
