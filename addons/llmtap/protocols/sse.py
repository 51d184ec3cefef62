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

    Bounded: a line still open is kept as a list of pieces and joined once, when it ends (no
    re-copy per chunk, so a long line costs linear time); a line longer than ``max_line`` bytes,
    or an event whose data grows past it, is dropped (``overflows`` counts them) and reading goes
    on at the next line.
    """

    __slots__ = ("_after_cr", "_data", "_data_size", "_pending", "_pending_size", "_skipping", "max_line", "overflows")

    def __init__(self, max_line: int = 16 << 20) -> None:
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._skipping = False  # inside a line too long to keep: dropped up to its end
        self._data: list[bytes] = []
        self._data_size = 0
        self._after_cr = False
        self.max_line = max_line
        self.overflows = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        if not chunk:
            return []
        has_cr = b"\r" in chunk
        if not has_cr and b"\n" not in chunk:  # the line goes on: keep the piece, copy nothing
            self._after_cr = False
            self._hold(chunk)
            return []
        self._after_cr = chunk.endswith(b"\r")
        # most streams end lines with LF alone, which a plain split finds three times faster
        lines = _LINE_BREAK.split(chunk) if has_cr else chunk.split(b"\n")
        last = lines.pop()
        if self._skipping:
            lines[0] = None  # the end of the overlong line
            self._skipping = False
        elif self._pending:
            self._pending.append(lines[0])
            lines[0] = b"".join(self._pending)
        self._pending, self._pending_size = [], 0
        events: list[bytes] = []
        for line in lines:
            if line is None:
                continue
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data, self._data_size = [], 0
            elif line.startswith(b"data:"):
                self._add_data(line[6:] if line.startswith(b"data: ") else line[5:])
            elif line == b"data":
                self._add_data(b"")
            # other fields (event, id, retry) and ":" comments carry nothing we record
        self._hold(last)
        return events

    def _hold(self, piece: bytes) -> None:
        if self._skipping or not piece:
            return
        self._pending_size += len(piece)
        if self._pending_size > self.max_line:
            self._pending, self._pending_size, self._skipping = [], 0, True
            self.overflows += 1
            return
        self._pending.append(piece)

    def _add_data(self, data: bytes) -> None:
        self._data_size += len(data) + 1
        if self._data_size > self.max_line:  # an event of many data lines: dropped whole
            self._data, self._data_size = [], 0
            self.overflows += 1
            return
        self._data.append(data)

    def flush(self) -> list[bytes]:
        """The stream ended: an event not closed by a blank line still counts."""
        if not self._skipping and self._pending:
            line = b"".join(self._pending)  # once, at the end
            if line.startswith(b"data"):
                self._pending = [line]
                self.feed(b"\n")
        events = [b"\n".join(self._data)] if self._data else []
        self._data, self._data_size = [], 0
        return events
