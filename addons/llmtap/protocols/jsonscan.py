"""The top-level members of one large JSON object, read piece by piece with bounded memory.

A record needs a handful of small members of a response body (``id``, ``model``, ``usage``,
``metadata``, ``choices``); a large body's bulk is elsewhere (an embeddings response holds
megabytes of ``data`` before its ``usage``; a hostile one a gigabyte-long string). So instead
of parsing the whole body, ``TopLevelScanner`` walks its structure (strings, brackets, the
colon and comma of the top level) with regular expressions, which skip the bytes in between at
C speed, and keeps the raw text of each top-level value up to ``value_cap`` bytes (all kept
values together up to ``total_cap``). A value larger than that is skipped, and named in
``skipped``: one oversized member costs that member only. Each kept value is parsed with the
standard JSON parser at the end; the scanner itself never raises on any input.
"""

from __future__ import annotations

import json
import re
from typing import Any

_STRING_STOP = re.compile(rb'["\\]')
_NESTED = re.compile(rb'["{}\[\]]')
_KEY_OR_END = re.compile(rb'["}]')
_COLON = re.compile(rb":")
_NON_SPACE = re.compile(rb"[^ \t\r\n]")
_SCALAR_END = re.compile(rb"[,}\]]")
_AFTER_VALUE = re.compile(rb"[,}]")

MAX_KEY_BYTES = 1024

# states: where the scanner is in the top-level object
_START = 0  # before the opening brace
_KEY = 1  # expecting a key or the closing brace
_KEY_STRING = 2  # inside a key
_COLON_NEXT = 3  # after a key
_VALUE_START = 4  # after the colon
_STRING_VALUE = 5  # inside a top-level string value
_NESTED_VALUE = 6  # inside a top-level object or array value, outside its strings
_NESTED_STRING = 7  # inside a string within such a value
_SCALAR = 8  # inside a number, true, false or null
_AFTER = 9  # after a value: a comma or the closing brace
_END = 10
_FAIL = 11


class TopLevelScanner:
    """Feed decoded pieces of a JSON object; ``members()`` gives the kept top-level members."""

    __slots__ = (
        "_depth",
        "_escape",
        "_keeping",
        "_kept_total",
        "_key",
        "_key_parts",
        "_parts",
        "_size",
        "_state",
        "members_raw",
        "skipped",
        "total_cap",
        "value_cap",
    )

    def __init__(self, value_cap: int, total_cap: int) -> None:
        self.value_cap = value_cap
        self.total_cap = total_cap
        self.members_raw: dict[str, bytes] = {}
        self.skipped: list[str] = []
        self._state = _START
        self._depth = 0
        self._escape = False
        self._key: str | None = None
        self._key_parts: list[bytes] = []
        self._parts: list[bytes] = []
        self._size = 0
        self._keeping = False
        self._kept_total = 0

    @property
    def complete(self) -> bool:
        return self._state == _END

    @property
    def failed(self) -> bool:
        return self._state == _FAIL

    def members(self) -> dict[str, Any] | None:
        """The kept members, parsed; None when the body is not a JSON object."""
        if self._state in (_START, _FAIL):
            return None
        found = {}
        for key, raw in self.members_raw.items():
            try:
                found[key] = json.loads(raw)
            except (ValueError, RecursionError):
                self.skipped.append(key)
        return found

    # --- keeping bytes of the current value ---
    def _keep(self, data: bytes) -> None:
        if not self._keeping or not data:
            return
        self._size += len(data)
        if self._size > self.value_cap or self._kept_total + self._size > self.total_cap:
            self._keeping = False
            self._parts = []
            if self._key is not None:
                self.skipped.append(self._key)
            return
        self._parts.append(data)

    def _begin_value(self) -> None:
        self._keeping = self._key is not None
        self._parts = []
        self._size = 0

    def _end_value(self) -> None:
        if self._keeping and self._key is not None:
            raw = b"".join(self._parts)
            self.members_raw[self._key] = raw
            self._kept_total += len(raw)
        self._keeping = False
        self._parts = []
        self._key = None

    def feed(self, data: bytes) -> None:
        try:
            self._feed(data)
        except Exception:  # never raise on hostile input: stop reading this body
            self._state = _FAIL

    def _feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state in (_END, _FAIL):
                return
            if state in (_KEY_STRING, _STRING_VALUE, _NESTED_STRING):
                i = self._in_string(data, i, n)
                continue
            if state == _START:
                m = _NON_SPACE.search(data, i)
                if m is None:
                    return
                if data[m.start()] != 0x7B:  # "{"
                    self._state = _FAIL
                    return
                self._depth, self._state, i = 1, _KEY, m.end()
            elif state == _KEY:
                m = _KEY_OR_END.search(data, i)
                if m is None:
                    return
                i = m.end()
                if data[m.start()] == 0x7D:  # "}"
                    self._state = _END
                    return
                self._key_parts, self._state = [b'"'], _KEY_STRING
            elif state == _COLON_NEXT:
                m = _COLON.search(data, i)
                if m is None:
                    return
                self._state, i = _VALUE_START, m.end()
            elif state == _VALUE_START:
                m = _NON_SPACE.search(data, i)
                if m is None:
                    return
                j = m.start()
                c = data[j]
                self._begin_value()
                if c == 0x22:  # '"'
                    self._keep(b'"')
                    self._state, i = _STRING_VALUE, j + 1
                elif c in (0x7B, 0x5B):  # "{" "["
                    self._keep(data[j : j + 1])
                    self._depth, self._state, i = 2, _NESTED_VALUE, j + 1
                else:
                    self._state, i = _SCALAR, j
            elif state == _SCALAR:
                m = _SCALAR_END.search(data, i)
                if m is None:
                    self._keep(data[i:])
                    return
                j = m.start()
                self._keep(data[i:j].rstrip())
                self._end_value()
                if data[j] == 0x7D:
                    self._state = _END
                    return
                self._state, i = (_KEY, j + 1) if data[j] == 0x2C else (_FAIL, n)
            elif state == _AFTER:
                m = _AFTER_VALUE.search(data, i)
                if m is None:
                    return
                i = m.end()
                if data[m.start()] == 0x7D:
                    self._state = _END
                    return
                self._state = _KEY
            elif state == _NESTED_VALUE:
                m = _NESTED.search(data, i)
                if m is None:
                    self._keep(data[i:])
                    return
                j = m.start()
                c = data[j]
                self._keep(data[i : j + 1])
                i = j + 1
                if c == 0x22:
                    self._state = _NESTED_STRING
                elif c in (0x7B, 0x5B):
                    self._depth += 1
                else:
                    self._depth -= 1
                    if self._depth == 1:
                        self._end_value()
                        self._state = _AFTER

    def _in_string(self, data: bytes, i: int, n: int) -> int:
        """Inside a string (key, top-level value or nested): up to its end, or the piece's end."""
        state = self._state
        if self._escape:
            self._escape = False
            self._keep_string(data[i : i + 1])
            i += 1
            if i >= n:
                return n
        while True:
            m = _STRING_STOP.search(data, i)
            if m is None:
                self._keep_string(data[i:])
                return n
            j = m.start()
            if data[j] == 0x5C:  # backslash: the next byte is escaped, wherever it is
                if j + 1 >= n:
                    self._keep_string(data[i:])
                    self._escape = True
                    return n
                self._keep_string(data[i : j + 2])
                i = j + 2
                continue
            self._keep_string(data[i : j + 1])
            i = j + 1
            if self._state == _FAIL:
                return n
            if state == _KEY_STRING:
                raw = b"".join(self._key_parts)
                self._key_parts = []
                try:
                    self._key = json.loads(raw)
                except (ValueError, RecursionError):
                    self._key = None
                self._state = _COLON_NEXT
            elif state == _STRING_VALUE:
                self._end_value()
                self._state = _AFTER
            else:  # a string inside a nested value
                self._state = _NESTED_VALUE
            return i

    def _keep_string(self, data: bytes) -> None:
        if self._state == _KEY_STRING:
            self._key_parts.append(data)
            if sum(map(len, self._key_parts)) > MAX_KEY_BYTES:
                self._state = _FAIL
        else:
            self._keep(data)
