"""The command line's options, made from the declared fields (:mod:`cq_core.engine.fields`).

:func:`with_field_options` gives a typer command one option per declared flag of the
classes it names (the recipe's, the run settings'), after the command's own parameters;
:func:`keywords_from` turns what the user typed back into the keywords those classes
take. An executor's option that declares a ``flag`` of its own (``cq_ray``'s
``--ray-address``) is added to ``cq convert`` by :class:`ConvertCommand` from the
installed executors, so no executor's flag is written in core.
"""

from __future__ import annotations

import functools
import inspect
import re
import typing
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer
import typer.main

from cq_core.cli.base import CqCommand
from cq_core.engine.fields import FieldSpec, Flag, field_specs
from cq_core.errors import UsageError
from cq_core.plugin.manager import get_registry


def dest(spec: FieldSpec, flag: Flag) -> str:
    """The command function's parameter name for ``flag``: its keyword, else the field's name
    (``no_measure`` for an inverted switch)."""
    if flag.invert:
        return "no_" + spec.name
    return flag.keyword or spec.name


def _parameter(spec: FieldSpec, flag: Flag) -> inspect.Parameter:
    kind = flag.cli_type or spec.kind.cli_type
    help_text = flag.help or spec.help
    option = typer.Option(*flag.decls, help=help_text, show_default=False, metavar=flag.metavar)
    if kind is bool:
        annotation, default = Annotated[bool, option], False
    elif typing.get_origin(kind) is list:
        annotation, default = Annotated[list[str], option], []
    else:
        annotation, default = Annotated[Optional[kind], option], None  # noqa: UP045 (typer reads Optional)
    return inspect.Parameter(dest(spec, flag), inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=annotation)


def with_field_options(*classes: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add every declared flag of ``classes``' fields to a typer command, after its own
    parameters; the command receives them as keyword arguments (``**fields``)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command)
        hints = typing.get_type_hints(command, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        extra = [_parameter(spec, flag) for cls in classes for spec in field_specs(cls) for flag in spec.flags]

        @functools.wraps(command)
        def wrapper(**values: Any) -> Any:
            return command(**values)

        del wrapper.__wrapped__  # typer reads the signature below, not the function's own
        wrapper.__signature__ = signature.replace(parameters=[*own, *extra])
        wrapper.__annotations__ = {p.name: p.annotation for p in (*own, *extra)}
        return wrapper

    return decorate


def keywords_from(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The keywords of ``cls`` (a recipe, run settings) that the flags typed give, taken out of
    ``values`` (the command's options by parameter name). A flag's own parser runs on what was
    typed (``-O a=1`` -> ``{"a": "1"}``); values that say nothing are left out."""
    keywords: dict[str, Any] = {}
    for spec in field_specs(cls):
        for flag in spec.flags:
            value = values.pop(dest(spec, flag))
            if flag.invert:
                value = False if value else None
            if value is None or (not flag.invert and not spec.kind.given(value)):
                continue
            if flag.keyword is None and flag.parse is not None:
                value = flag.parse(value)
            keywords[flag.keyword or spec.name] = value
    return keywords


# ---------------------------------------------------------------------------
# Executor flags: options an executor gives a flag of their own
# ---------------------------------------------------------------------------

_EXECUTOR_FLAG = "executor_flag_{}_{}"
#: ``ctx.meta`` key: executor flag parameter name -> the value typed (None: not given)
EXECUTOR_FLAGS = "cq.executor_flags"


def _options_of(parameters: list[inspect.Parameter]) -> list[Any]:
    """click parameters for ``parameters`` (typer-annotated), made by typer itself: the
    parameters of a throwaway one-command app (whatever click this typer uses)."""

    def command(**values: Any) -> None:  # pragma: no cover (never invoked)
        del values

    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    scratch = typer.Typer()
    scratch.command()(command)
    return list(typer.main.get_command(scratch).params)


class ConvertCommand(CqCommand):
    """``cq convert``: besides its declared options, one per executor option that names a
    ``flag`` (:class:`cq_core.plugin.types.Option`), from the installed executors; their values
    reach the command in ``ctx.meta[EXECUTOR_FLAGS]`` (:func:`executor_flags` reads them)."""

    def _executor_flag_params(self) -> list[Any]:
        if not hasattr(self, "_executor_flags"):
            parameters = []
            for name, executor in sorted(get_registry().executors.items()):
                for option in executor.options:
                    if option.flag is not None:
                        help_text = f"With --executor {name}: {option.help} (= --executor-option {option.name}=VALUE)."
                        parameters.append(inspect.Parameter(
                            _EXECUTOR_FLAG.format(_identifier(name), _identifier(option.name)),
                            inspect.Parameter.KEYWORD_ONLY, default=None,
                            annotation=Annotated[Optional[str], typer.Option(option.flag, help=help_text,  # noqa: UP045
                                                                             show_default=False)],
                        ))
            self._executor_flags = _options_of(parameters) if parameters else []
        return self._executor_flags

    def get_params(self, ctx: Any) -> list[Any]:
        return [*super().get_params(ctx), *self._executor_flag_params()]

    def invoke(self, ctx: Any) -> Any:
        ctx.meta[EXECUTOR_FLAGS] = {p.name: ctx.params.pop(p.name, None) for p in self._executor_flag_params()}
        return super().invoke(ctx)


def executor_flags(ctx: Any, executor: str | None) -> dict[str, str]:
    """The executor options given by their own flags (``ctx``: the command's context); a flag of
    another executor than ``executor`` is a :class:`UsageError` naming both."""
    typed = ctx.meta.get(EXECUTOR_FLAGS, {})
    given: dict[str, str] = {}
    for name, cls in sorted(get_registry().executors.items()):
        for option in cls.options:
            value = typed.get(_EXECUTOR_FLAG.format(_identifier(name), _identifier(option.name)))
            if option.flag is None or value is None:
                continue
            if executor != name:
                raise UsageError(f"{option.flag} needs --executor {name}.")
            given[option.name] = value
    return given


def _identifier(name: str) -> str:
    return re.sub(r"\W", "_", name)

