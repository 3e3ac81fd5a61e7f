"""CLI options generated from the settings fields, and the one way commands turn flags into Settings.

A command lists the settings it takes; `setting_flags` adds one typer option per field (spelling, help, default
and bounds all from the field) and calls the command with `flags`, the values the user actually gave:

    @setting_flags("dtype", "device")
    def chat(model_dir: ..., *, flags: SettingFlags) -> None:
        settings = settings_from(**flags)

Typer reads a command's parameters from `inspect.signature`, so the wrapper carries a built `__signature__`.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import annotated_types
import typer
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from rich.markup import escape

from vlmbridge.settings import ModelSettings, ServerSettings, Settings

__all__ = ["RUN_SETTINGS", "SettingFlags", "env_var", "flag_of", "setting_flags", "setting_parameter", "settings_from"]

R = TypeVar("R")
SettingFlags = dict[str, Any]

# What loading and running one model for a single conversation takes (`chat`; `demo` adds its own).
RUN_SETTINGS = (
    "dtype", "device", "attn_implementation", "quantization", "allow_dequantize", "allow_pickle_weights",
    "trust_remote_code", "context_length", "max_pixels", "min_pixels", "torch_threads",
)  # fmt: skip

_PANELS = ((ModelSettings, "Model"), (ServerSettings, "Server"))


def env_var(name: str) -> str:
    """The environment variable of a settings field."""
    prefix = Settings.model_config.get("env_prefix", "")
    return f"{prefix}{name}".upper()


def _extra(field: FieldInfo) -> dict[str, Any]:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def flag_of(name: str) -> str:
    """The flag declaration of a settings field: `--field-name`, or the spelling the field names."""
    flag = _extra(Settings.model_fields[name]).get("flag")
    return flag if isinstance(flag, str) else "--" + name.replace("_", "-")


def _cli_type(annotation: Any) -> tuple[Any, bool]:
    """(the type typer parses, whether the option is repeatable) for a field's annotation."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = (a for a in args if a is not type(None))
        args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is list:
        item = args[0]
        return types.GenericAlias(list, (str if item is SecretStr else item,)), True
    if origin is dict:  # given on the command line as repeatable specs the field's validator parses
        return list[str], True
    if annotation is SecretStr:
        return str, False
    if annotation in (bool, int, float, str, Path) or origin is typing.Literal:
        return annotation, False
    raise TypeError(f"no command-line type for {annotation!r}")


def _bounds(field: FieldInfo) -> dict[str, Any]:
    # Open bounds (gt/lt) become closed ones on the command line; the field itself still checks them exactly.
    bounds: dict[str, Any] = {}
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge | annotated_types.Gt):
            bounds["min"] = item.ge if isinstance(item, annotated_types.Ge) else item.gt
        elif isinstance(item, annotated_types.Le | annotated_types.Lt):
            bounds["max"] = item.le if isinstance(item, annotated_types.Le) else item.lt
    return bounds


def _default_text(field: FieldInfo, flag: str) -> str:
    default = field.get_default(call_default_factory=False)
    if field.default_factory is not None or default is None:
        return ""  # the description says what happens
    if isinstance(default, bool):
        on, sep, off = flag.partition("/")
        return f" [default: {(on if default else off).lstrip('-')}]" if sep else ""
    return f" [default: {default}]"


def setting_parameter(name: str) -> inspect.Parameter:
    """A keyword-only command parameter (default None = not given) carrying the typer option of a field."""
    field = Settings.model_fields[name]
    if "argument" in _extra(field):
        raise ValueError(f"{name} is a command argument, not an option")
    flag = flag_of(name)
    cli_type, repeatable = _cli_type(field.annotation)
    if _extra(field).get("size"):  # "2GiB": the field's validator parses it
        cli_type = str
    description = field.description or ""
    repeat = " Repeatable." if repeatable and "repeatable" not in description.lower() else ""
    help_text = f"{description}{repeat} [env: {env_var(name)}]{_default_text(field, flag)}"
    panel = next(title for part, title in _PANELS if name in part.model_fields)
    option = typer.Option(
        flag,
        help=escape(help_text),
        show_default=False,
        rich_help_panel=f"{panel} settings",
        **(_bounds(field) if cli_type in (int, float) else {}),
    )
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[cli_type | None, option]
    )


def setting_flags(*names: str) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Give a command one option per settings field in `names`; it is called with `flags`: those the user gave.

    The command declares its own arguments and options as usual plus a keyword parameter `flags`."""
    generated = [setting_parameter(name) for name in names]

    def wrap(command: Callable[..., R]) -> Callable[..., R]:
        signature = inspect.signature(command, eval_str=True)
        if "flags" not in signature.parameters:
            raise TypeError(f"{command.__name__} must take a `flags` keyword parameter")
        own = [p for p in signature.parameters.values() if p.name != "flags"]
        clash = {p.name for p in own} & set(names)
        if clash:
            raise TypeError(f"{command.__name__}: {sorted(clash)} are both its own parameters and settings")
        params = [*own, *generated]

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> R:
            given = {name: kwargs.pop(name) for name in names if name in kwargs}
            return command(*args, flags=given, **kwargs)

        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}  # what typer's get_type_hints reads
        return run

    return wrap


def settings_from(**flags: Any) -> Settings:
    """Settings from the environment, overridden by the flags the user actually gave."""
    given = {k: v for k, v in flags.items() if v is not None and v != []}
    return Settings(**given)
