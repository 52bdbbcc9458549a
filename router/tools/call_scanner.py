"""One tool call's JSON object read a character at a time: ``{"name": ..., "arguments": {...}}``.

The scanner never waits for the whole object: the name is known as soon as its string closes, and
the arguments (an object) are handed out as their raw characters arrive, so a stream can forward
them at once. The raw text is the answer's ``arguments``: the streamed fragments concatenate to
exactly the whole answer's string. Arguments sent as a JSON string holding an object (some models
do) or ``null`` are handed out whole when they end.

The first key that is not ``name`` or an arguments key, before the name is known, means the object
is not a tool call (``failed``), so a caller can give its text back as content.
"""

from __future__ import annotations

import json

_WS = " \t\r\n"
_SCALAR_START = "-0123456789tfn"


class CallScanner:
    """Feed text with :meth:`feed`; read ``name``, :meth:`take_arguments`, ``done`` and ``failed``."""

    def __init__(self, arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> None:
        self.arguments_keys = arguments_keys
        self.name: str | None = None
        self.arguments: str | None = None  # the whole arguments text, once it has ended
        self.done = False  # the object closed
        self.failed = False  # not a tool call (or not JSON)
        self._state = "open"
        self._key: str | None = None
        self._seen: set[str] = set()
        self._buf: list[str] = []  # the current key's or value's raw characters
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._fragments: list[str] = []  # arguments characters not yet taken

    def feed(self, text: str) -> int:
        """Take in ``text`` up to the object's end; -> how many characters were used (the rest is
        what follows the object). Stops early (and uses no more) once ``done`` or ``failed``."""
        for i, ch in enumerate(text):
            if self.done or self.failed:
                return i
            self._step(ch)
        return len(text)

    def take_arguments(self) -> str:
        """The arguments characters read since the last call (streaming)."""
        out = "".join(self._fragments)
        self._fragments.clear()
        return out

    # -- the state machine -------------------------------------------------------------------------

    def _step(self, ch: str) -> None:
        state = self._state
        if state in ("open", "key_or_end", "key_start", "colon", "value_start", "after_value") and ch in _WS:
            return
        if state == "open":
            self._expect(ch == "{", "key_or_end")
        elif state == "key_or_end":
            if ch == "}":
                self._end()
            else:
                self._expect(ch == '"', "key")
        elif state == "key_start":
            self._expect(ch == '"', "key")
        elif state == "key":
            if self._string_char(ch):
                self._end_key()
        elif state == "colon":
            self._expect(ch == ":", "value_start")
        elif state == "value_start":
            self._start_value(ch)
        elif state == "container":
            self._container_char(ch)
        elif state == "string_value":
            self._buf.append(ch)
            if self._string_char(ch):
                self._end_value()
        elif state == "scalar":
            if ch in _WS or ch in ",}":
                self._end_value()
                self._step(ch)
            else:
                self._buf.append(ch)
        elif state == "after_value":
            if ch == ",":
                self._state = "key_start"
            elif ch == "}":
                self._end()
            else:
                self.failed = True

    def _expect(self, ok: bool, then: str) -> None:
        if ok:
            self._state = then
            self._buf = []
        else:
            self.failed = True

    def _string_char(self, ch: str) -> bool:
        """Inside a key or string value: True at its closing quote (the key's quote is not kept)."""
        if self._escape:
            self._escape = False
        elif ch == "\\":
            self._escape = True
        elif ch == '"':
            return True
        if self._state == "key":
            self._buf.append(ch)
        return False

    def _end_key(self) -> None:
        try:
            key = json.loads('"' + "".join(self._buf) + '"')
        except ValueError:
            self.failed = True
            return
        known = key == "name" or key in self.arguments_keys
        if key in self._seen or (not known and self.name is None):
            self.failed = True
            return
        self._seen.add(key)
        self._key = key
        self._state = "colon"

    def _start_value(self, ch: str) -> None:
        self._buf = [ch]
        if ch in "{[":
            self._depth, self._in_string, self._escape = 1, False, False
            self._state = "container"
            if self._key in self.arguments_keys:
                self._fragments.append(ch)
        elif ch == '"':
            self._escape = False
            self._state = "string_value"
        elif ch in _SCALAR_START:
            self._state = "scalar"
        else:
            self.failed = True

    def _container_char(self, ch: str) -> None:
        self._buf.append(ch)
        if self._key in self.arguments_keys:
            self._fragments.append(ch)
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
        elif ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            if self._depth == 0:
                self._end_value()

    def _end_value(self) -> None:
        raw = "".join(self._buf)
        self._state = "after_value"
        try:
            value = json.loads(raw)
        except ValueError:
            self.failed = True
            return
        if self._key == "name":
            if not isinstance(value, str) or not value:
                self.failed = True
            else:
                self.name = value
        elif self._key in self.arguments_keys:
            self._set_arguments(raw, value)

    def _set_arguments(self, raw: str, value: object) -> None:
        if isinstance(value, dict):
            self.arguments = raw  # its characters went out as they came
            return
        if value is None:
            text = "{}"
        elif isinstance(value, str):  # arguments sent as a JSON string holding the object
            try:
                inner = json.loads(value)
            except ValueError:
                inner = None
            if not isinstance(inner, dict):
                self.failed = True
                return
            text = value
        else:
            self.failed = True
            return
        self.arguments = text
        self._fragments.append(text)

    def _end(self) -> None:
        if self.name is None:
            self.failed = True
            return
        if self.arguments is None:  # a call without arguments takes none
            self.arguments = "{}"
            self._fragments.append("{}")
        self.done = True
