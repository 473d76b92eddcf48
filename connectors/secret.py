"""``Secret``: the product's one type for a value that must never print (API tokens, Kafka passwords).

Its ``repr`` and ``str`` (and so f-strings, ``%s`` in log calls and a dataclass's repr) are ``***``; only
``reveal()`` gives the value, for the one place that hands it to a client library. ``redact(text)`` masks the
value inside a text such as an error message from that library (a value of 4 characters or more).
"""

from __future__ import annotations

import hmac


class Secret:
    """A string that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def redact(self, text: str) -> str:
        """``text`` with the value masked. A value shorter than 4 characters is left alone: masking every "p" of
        a text would damage it and show where the value occurs, i.e. what it is."""
        return text.replace(self._value, "***") if len(self._value) >= 4 else text

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        # Constant time: a comparison must not tell how much of a guess was right.
        return isinstance(other, Secret) and hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format(repr(self), spec)
