"""Command-line flags generated from an options dataclass: each setting is written once, as a field.

    add_flags(parser, ServerOptions)             # --model, --engine, ... one per field
    options = from_args(ServerOptions, parser.parse_args(argv))
    argv = to_argv(options)                      # the same options as flags, for a child process

A field's type (its annotation, `X | None` read as X) gives the flag's type; a bool field is
a switch; `metadata` may carry `help`, `choices` and `metavar`.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, field, fields
from typing import Any


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, **more: Any) -> Any:
    """A dataclass field whose flag help is written with it: `name: int = option(3, "passages per search")`."""
    return field(default=default, default_factory=default_factory, metadata={"help": help, **more})


def add_flags(parser: argparse.ArgumentParser, cls: type, help: dict[str, str] | None = None,
              skip: tuple[str, ...] = (), show_default: bool = True) -> None:
    """One `--name` per field of `cls` (underscores become dashes), its default the field's."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        kind, text = scalar(hints[f.name]), f.metadata.get("help", (help or {}).get(f.name, ""))
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=text)
            continue
        default = None if f.default is MISSING else f.default
        parser.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"),
                            metavar=f.metadata.get("metavar"), help=f"{text} [default: {default}]" if show_default and default is not None else text)


def from_args(cls: type, args: argparse.Namespace, **extra: Any):
    """An instance of `cls` from parsed flags (fields the parser lacks keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**given, **extra)


def to_argv(options: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """Flags that rebuild `options` through `add_flags`' parser: every field that differs from its default."""
    argv: list[str] = []
    for f in fields(options):
        value = getattr(options, f.name)
        if f.name in skip or value == f.default or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def scalar(hint: Any) -> type:
    """The flag type of an annotation: `int`, `Path | None` -> Path, ..."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint
