"""Command-line flags generated from a config dataclass: one flag per field, its help from the field.

A field is declared with :func:`option` (its default and its help text); :func:`build_parser`
turns ``--name-with-dashes`` into the field ``name_with_dashes``, takes the type (and the
choices of a ``Literal``) from the field's type hint, and leaves flags not given out of
the namespace, so the caller can tell a default from a value given.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Literal

__all__ = ["option", "build_parser"]

METAVARS = {"resume": "PATH", "out": "DIR", "data_dir": "DIR"}


def option(default: Any, help: str) -> Any:
    """A config field with its flag's help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def _flag_type(hint: Any) -> tuple[type, list[str] | None]:
    """The argparse type (and choices) of a field's type hint."""
    if typing.get_origin(hint) is Literal:
        return str, list(typing.get_args(hint))
    options = [a for a in typing.get_args(hint) if a is not type(None)]  # X | None -> X
    return _flag_type(options[0]) if options else (hint, None)


def _metavar(name: str, kind: type) -> str:
    return METAVARS.get(name) or {int: "N", float: "X"}.get(kind, "NAME")


def build_parser(config: type, description: str, epilog: str) -> argparse.ArgumentParser:
    """One flag per field of the dataclass ``config``, its help from the field; only flags given
    appear in the namespace.

    Example:
        >>> @dataclasses.dataclass
        ... class Settings:
        ...     steps: int = option(10, "steps in all")
        >>> vars(build_parser(Settings, "", "").parse_args(["--steps", "3"]))
        {'steps': 3}
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS, epilog=epilog,
    )
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        flag, text = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} (default: {f.default})"
        kind, choices = _flag_type(hints[f.name])
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, type=kind, choices=choices, help=text,
                                metavar=None if choices else _metavar(f.name, kind))
    return parser
