"""``InvalidParam``: a bad value of one named field, the name carried as data."""

from __future__ import annotations


class InvalidParam(ValueError):
    """A bad value of one named field; ``field`` carries its name as data (an API answers 400 with
    ``param = field`` without parsing the message). ``reason``, when given, is the message without the
    name ("must be >= 1, got 0"), for a caller that spells the field its own way."""

    def __init__(self, field: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.field, self.reason = field, reason

    def renamed(self, name: str) -> str:
        """The message, naming the field ``name``."""
        if name == self.field or self.reason is None:
            return str(self)
        return f"{name} {self.reason}"
