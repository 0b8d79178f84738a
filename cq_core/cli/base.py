"""What every ``cq`` command shares: plain help text and one-line usage errors,
the same with older typer (on click) and typer 0.29+ (click vendored inside)."""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand

#: Settings for every ``typer.Typer`` of the ``cq`` command line. Plain help
#: (no rich panels): rich help prints a type after plain flags (``--json <bool>``).
#: No help on a bare group: newer click makes that an exit-2 error that prints
#: the whole help, older click an exit 0; ``Missing command`` is one line everywhere.
TYPER_SETTINGS: dict[str, Any] = {
    "add_completion": False,
    "pretty_exceptions_enable": False,
    "rich_markup_mode": None,
    "no_args_is_help": False,
}


class CqCommand(TyperCommand):
    """A command whose usage line reads ``cq convert [OPTIONS] INPUT``
    (typer 0.29 writes ``{input}`` for a required argument), and whose help
    and errors name arguments the same way (INPUT, as the docstrings do)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.param_type_name == "argument" and param.metavar is None and param.name:
                param.metavar = param.name.upper()
            elif getattr(param, "multiple", False) and param.metavar is None:
                param.metavar = "<str>"  # one value per use (typer writes <list[str]>); the help says repeatable

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                continue
            name = (param.metavar or param.name or "").upper()
            if param.nargs != 1:
                name += "..."
            pieces.append(name if param.required else f"[{name}]")
        return pieces


def _click_exception_class() -> type[Exception]:
    # typer re-exports click's BadParameter under both kinds of typer, so its
    # bases name the ClickException class this typer raises.
    for cls in typer.BadParameter.__mro__:
        if cls.__name__ == "ClickException":
            return cls
    raise AssertionError("typer.BadParameter does not derive from a ClickException")


ClickException = _click_exception_class()


def click_error_line(exc: ClickException) -> str:
    """One line for a click error: the message and, for a usage error, where help is."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if ctx is not None and exc.exit_code == 2:
        message = f"{message.rstrip('.')}; see '{ctx.command_path} --help'."
    return message
