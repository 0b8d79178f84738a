"""The one exception type cq raises for problems a user can act on."""

from __future__ import annotations


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
