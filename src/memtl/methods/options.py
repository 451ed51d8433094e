"""Method options, each declared once: a dataclass field whose annotation is its type and
whose ``option(...)`` gives its default, what it is and the values it allows.

    @dataclass
    class LoraOptions(MethodOptions):
        r: int = option(8, "the LoRA rank", min=1)
        dropout: float | None = option(None, "dropout on the input", min=0, lt=1, null="the model's dropout")

Types: ``int``, ``float`` (an int is accepted; finite), ``bool``, ``str``, ``list[str]``
(non-empty); ``| None`` allows null, meaning ``null``. Ranges: ``min`` (inclusive), ``gt``
(exclusive), ``lt`` (exclusive, with one of them), ``nonzero``; ``choices``: a tuple, or a dict
name -> what it does.
``check`` (run by ``MethodOptions.__post_init__``) rejects any other value with one line,
``method.<name>=<value>: <what is allowed>``; the same text is ``memtl options``' listing.
``conf/method/*.yaml`` repeat the defaults (tests/test_configs.py keeps them equal).

    memtl options [method ...]       every option: name=default, what it is, what it allows
"""
from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from memtl.errors import ConfigError


def is_int(x) -> bool:  # not a bool
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:  # not a bool, nor a string a typo left
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def option(default: Any, doc: str, *, null: str | None = None, choices: tuple | dict | None = None,
           min: float | None = None, gt: float | None = None, lt: float | None = None, nonzero: bool = False) -> Any:
    """A dataclass field: ``default``; ``doc``, a noun phrase (what the option is); the rest as above."""
    return dataclasses.field(default=default, metadata=dict(
        doc=doc, null=null, choices=choices, min=min, gt=gt, lt=lt, nonzero=nonzero))


class MethodOptions:
    """Base of a method's options dataclass: every field is checked against its declaration.
    A subclass with checks across fields adds them after ``super().__post_init__()``."""

    def __post_init__(self):
        check(self)


def check(opts) -> None:
    for f, kind, nullable in _fields(type(opts)):
        value = getattr(opts, f.name)
        if not (value is None and nullable or _allows(f.metadata, kind, value)):
            what = "choose" if f.metadata["choices"] else f"{f.metadata['doc']} must be"
            raise ConfigError(f"method.{f.name}={value!r}: {what} {allowed(f, kind, nullable)}")


def allowed(f: dataclasses.Field, kind: type, nullable: bool) -> str:
    """What ``f`` allows, in words: 'an integer >= 1', 'true or false', 'one of a, b', '..., or null for ...'."""
    m = f.metadata
    null = f", or null for {m['null']}" if nullable else ""
    if m["choices"]:
        c = m["choices"]
        return (_or([f"{k} ({v})" for k, v in c.items()]) if isinstance(c, dict) else f"one of {', '.join(c)}") + null
    if kind in (bool, list, str):
        return {bool: "true or false", list: "a non-empty list of names", str: "a string"}[kind] + null
    noun = "a finite non-zero number" if m["nonzero"] else "an integer" if kind is int else "a number"
    if m["lt"] is not None:  # an interval: [min, lt) or (gt, lt)
        return f"{noun} in {'[' + str(m['min']) if m['min'] is not None else '(' + str(m['gt'])}, {m['lt']}){null}"
    bound = f" >= {m['min']}" if m["min"] is not None else f" > {m['gt']}" if m["gt"] is not None else ""
    return noun + bound + null


def _allows(m: dict, kind: type, v: Any) -> bool:
    if kind is bool:
        return isinstance(v, bool)
    if kind is list:
        # (an OmegaConf ListConfig is a Sequence too; a str is not a list of names)
        return (isinstance(v, Sequence) and not isinstance(v, str) and len(v) > 0
                and all(isinstance(x, str) for x in v))
    if kind is str:
        return isinstance(v, str) and (not m["choices"] or v in m["choices"])
    if not (is_int(v) if kind is int else is_number(v) and math.isfinite(v)):
        return False
    return not ((m["min"] is not None and v < m["min"]) or (m["gt"] is not None and v <= m["gt"])
                or (m["lt"] is not None and v >= m["lt"]) or (m["nonzero"] and v == 0))


def _fields(cls: type) -> list[tuple[dataclasses.Field, type, bool]]:
    """Each field with its type (int, float, bool, str or list) and whether it may be None."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        kind = next(a for a in args if a is not type(None))
        out.append((f, typing.get_origin(kind) or kind, type(None) in args))
    return out


def _or(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _yaml(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def describe(name: str) -> str:
    """``memtl options <name>``: every option of method ``name``, one per line."""
    from memtl.methods import method_options

    rows = [f"  {f.name + '=' + _yaml(f.default):<30} {f.metadata['doc']}: {allowed(f, kind, nullable)}"
            for f, kind, nullable in _fields(type(method_options(name)))]
    return "\n".join([f"method={name}" + ("" if rows else " (no options)"), *rows])


def main(argv: list[str] | None = None) -> int:
    from memtl.methods import available_methods

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print("memtl options [method ...]: each option of each method (all without one) as name=default, "
              "what it is and the values it allows; set one with python train.py method=<method> method.<name>=<value>")
        return 0
    try:
        text = "\n\n".join(describe(name) for name in (argv or available_methods()))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0
