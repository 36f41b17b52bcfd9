"""Process settings: one frozen dataclass per process, each field a command-line flag with an
environment-variable twin (`--max-queue` <-> `SPINDLE_MAX_QUEUE`).

Declare the fields with `setting(default, help)` and build the object once at start-up with
`load_settings(GatewaySettings)`. The environment is read when `load_settings` runs, never at
import time. Precedence: flag, then environment variable, then the field's default.

Supported field types: `str`, `int`, `float`, `bool` (`--flag/--no-flag`; env 1/0, true/false,
yes/no, on/off), `pathlib.Path`, `Literal[...]` (choices), `tuple[X, ...]` (flag takes several
values, env is comma-separated) and `X | None` of any of those (an empty env value means None).
A `ValueError` raised by the dataclass's `__post_init__` is reported as a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar, cast

ENV_PREFIX = "SPINDLE_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

SettingsT = TypeVar("SettingsT")


def setting(default: Any, help: str) -> Any:
    """A settings field: its default and the help line its flag shows."""
    if isinstance(default, list | dict | set):
        raise TypeError("settings defaults must be immutable; use a tuple")
    return dataclasses.field(default=default, metadata={"help": help})


def env_name(field_name: str, prefix: str = ENV_PREFIX) -> str:
    """`max_queue` -> `SPINDLE_MAX_QUEUE`."""
    return prefix + field_name.upper()


def flag_name(field_name: str) -> str:
    """`max_queue` -> `--max-queue`."""
    return "--" + field_name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class _FieldKind:
    """How one field's text is parsed: the base converter, and whether it may be None or a tuple."""

    convert: Callable[[str], Any]
    optional: bool
    is_tuple: bool
    choices: tuple[Any, ...] | None
    is_bool: bool


def _field_kind(annotation: Any) -> _FieldKind:
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            raise TypeError(f"unsupported settings type {annotation}")
        optional, annotation = True, members[0]
    is_tuple = typing.get_origin(annotation) is tuple
    if is_tuple:
        annotation = typing.get_args(annotation)[0]
    choices = None
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        annotation = type(choices[0])
    convert = _parse_bool if annotation is bool else annotation
    return _FieldKind(convert, optional, is_tuple, choices, annotation is bool)


def env_switch(name: str) -> bool:
    """An on-by-default switch from the environment: off only for 0/false/no/off."""
    return os.environ.get(name, "1").strip().lower() not in _FALSE


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")


def _parse_env(text: str, kind: _FieldKind) -> Any:
    if kind.optional and text.strip() == "":
        return None
    if kind.is_tuple:
        return tuple(kind.convert(part.strip()) for part in text.split(",") if part.strip())
    value = kind.convert(text)
    if kind.choices is not None and value not in kind.choices:
        raise ValueError(f"expected one of {', '.join(map(str, kind.choices))}")
    return value


def _add_flag(
    parser: argparse.ArgumentParser, field: dataclasses.Field[Any], kind: _FieldKind, env: str
) -> None:
    shown_default = "none" if field.default is None else field.default
    help_text = f"{field.metadata.get('help', '')} [env {env}; default {shown_default}]"
    name = flag_name(field.name)
    if kind.is_bool:
        parser.add_argument(
            name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
        )
        return
    convert = kind.convert
    if kind.optional:
        base = kind.convert
        convert = lambda text: None if text == "" else base(text)  # noqa: E731
    parser.add_argument(
        name,
        type=convert,
        choices=kind.choices,
        nargs="+" if kind.is_tuple else None,
        metavar=None if kind.choices else field.name.upper(),
        default=argparse.SUPPRESS,  # so load_settings can tell "not given" from any value
        help=help_text,
    )


def settings_parser(
    cls: type[Any], *, prog: str | None = None, description: str | None = None
) -> argparse.ArgumentParser:
    """The argparse parser for a settings dataclass (flags only; env twins are applied by
    `load_settings`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description or cls.__doc__)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        _add_flag(parser, field, _field_kind(hints[field.name]), env_name(field.name))
    return parser


def load_settings(
    cls: type[SettingsT],
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> SettingsT:
    """Build the settings object from flags (`argv`, default sys.argv[1:]), then environment
    variables (`environ`, default os.environ, read now), then defaults. Bad values exit with a
    usage message naming the flag or variable, like argparse does."""
    environ = os.environ if environ is None else environ
    parser = settings_parser(cls, prog=prog, description=description)
    parsed = vars(parser.parse_args(argv))
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cast(Any, cls)):
        if field.name in parsed:
            value = parsed[field.name]
            values[field.name] = tuple(value) if isinstance(value, list) else value
            continue
        env = env_name(field.name)
        if env in environ:
            try:
                values[field.name] = _parse_env(environ[env], _field_kind(hints[field.name]))
            except (TypeError, ValueError) as err:
                parser.error(f"{env}={environ[env]!r} is not valid: {err}")
    try:
        return cls(**values)
    except ValueError as err:
        parser.error(str(err))
    raise AssertionError("unreachable: parser.error exits")
