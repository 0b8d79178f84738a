"""The one exception type cq raises for problems a user can act on, and how a message (or any
line of human output) shows a value it did not choose: a tensor name, a string read from a file."""

from __future__ import annotations

import re


class CqError(Exception):
    """A problem with the user's input, options or environment.

    The message is one sentence that names the file, tensor or flag at fault.
    The CLI prints it as a single line and exits with ``exit_code``
    (1 for bad input, 2 for bad usage).
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(CqError):
    """A bad option or option combination (exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


class PluginError(CqError):
    """A plugin that breaks the contract: a duplicate name, a bad hook, a lying spec."""


#: The most characters of one value (a name, a pattern, a string read from a file) a message
#: echoes: a forged 20 MB string must not become a 20 MB line of stderr.
ECHO_LIMIT = 200


def quoted(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` for a message, cut to about ``limit`` characters: ``'abc…' (20000000 characters)``."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit + 2 else f"{text[:limit]}… ({len(text)} characters)"


#: The most characters one printed value or line keeps (:func:`printable`); the middle goes.
LINE_LIMIT = 2000


def printable(text: object, limit: int | None = None) -> str:
    """``text`` safe to print on a terminal as part of one line: every character Python does not
    call printable (C0/C1 controls such as newline, carriage return and ESC; format characters
    such as the bidi overrides U+202A..U+202E and isolates U+2066..U+2069; line and paragraph
    separators; lone surrogates) is written as its escape (``\\n``, ``\\x1b``, ``\\u202e``), so a
    checkpoint's names cannot forge lines or reorder them. With ``limit``, a longer text keeps
    its start and end and says how much was cut. JSON output never goes through this."""
    text = str(text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if limit is not None and len(text) > limit:
        head, tail = text[: limit * 2 // 3], text[-(limit // 3):]
        text = f"{head}… ({len(text) - len(head) - len(tail)} characters cut) …{tail}"
    return text


#: Python's message for an integer literal longer than it converts (``sys.int_info``), advice included.
_INT_DIGITS = re.compile(
    r"Exceeds the limit \((\d+) digits\) for integer string conversion(?:: value has (\d+) digits)?"
    r"(?:; use sys\.set_int_max_str_digits\(\) to increase the limit)?"
)


def without_python_advice(text: str) -> str:
    """``text`` with Python's advice to the programmer (``use sys.set_int_max_str_digits()``)
    replaced by what it means for the value: an integer with more digits than any size or count."""
    return _INT_DIGITS.sub(
        lambda m: f"an integer of {m[2] + ' digits' if m[2] else f'more than {m[1]} digits'}, "
                  "far beyond any count or size", text)


def exception_text(exc: BaseException, limit: int = ECHO_LIMIT) -> str:
    """A library's exception as part of a one-line message: one line, Python's advice to the
    programmer replaced (:func:`without_python_advice`), cut to about ``limit`` characters."""
    text = without_python_advice(" ".join(str(exc).split())) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "…"
