"""The drivers' command lines: a verb's flags are the fields of its typed config, parsed by jsonargparse.

A `Command` couples a verb's config (a dataclass) with the function that runs it. Every field is one flag: the
string literal under the field is the flag's help, the field's type gives the flag's form and jsonargparse checks
the values against it, and `flag` metadata says what differs from the defaults:

* ``--<name>`` with dashes (``max_drop`` -> ``--max-drop``); the underscore spelling, LightningCLI's
  (``--max_drop``), is accepted too;
* ``bool``: a switch, ``--<name>`` / ``--no-<name>``;
* ``list[T]`` / ``tuple[T, ...]``: ``--<name> V [V ...]`` (``flag(nargs="*")``, or an empty default: may be
  given without values);
* ``Literal[...]`` or ``flag(choices=...)``: the choices; ``T | None``: a ``T``, None when the flag is not given;
* ``flag("-c", "--config")``: other names; ``flag(repeat=True)``: one value per occurrence, collected in a list;
* ``flag(positional=True)``: a positional argument (a list: one or more values; with a default: optional);
* a dataclass-typed field: its own fields are flags too, and it is built from them;
* ``flag(cli=False)``: not a flag. Three such fields are filled by the parse: ``command`` (the command line as
  typed, for a run's record), ``argv`` (its arguments, a list) and ``overrides`` (with
  ``Command(overrides=True)``: every ``--option`` that is not one of the verb's own, with its value, for the
  LightningCLI configuration).

A value the types accept but the config refuses (its ``__post_init__`` raising ``ValueError``, the message naming
the flag) stops the parse like a type error: usage, the message, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import shlex
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import docstring_parser
from jsonargparse import ActionYesNo, DefaultHelpFormatter
from jsonargparse import ArgumentParser as JsonArgumentParser

FILLED = ("command", "argv", "overrides")


def flag(
    *names: str,
    positional: bool = False,
    repeat: bool = False,
    cli: bool = True,
    **argparse_kwargs: Any,
) -> dict[str, Any]:
    """Field metadata for the command line (see the module docstring): the flag's names (default
    ``--<field-name>``), ``positional``, ``repeat``, ``cli=False`` (not a flag) and argparse keywords (``nargs``,
    ``metavar``, ``choices``)."""
    return {"flag": names, "positional": positional, "repeat": repeat, "cli": cli, **argparse_kwargs}


class _Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help (types and defaults) with the description and epilog printed as written."""


class _Parser(JsonArgumentParser):
    """jsonargparse's parser, its errors naming the flag (``--max-drop``) instead of the key (``max_drop``)."""

    flag_names: dict[str, str]  #: field -> the flag that sets it

    def error(self, message: str, ex: Exception | None = None) -> typing.NoReturn:
        def named(match: re.Match) -> str:
            return f"argument {self.flag_names.get(match.group(1), match.group(1))}"

        message = re.sub(r'Parser key "([\w.]+)"', named, message)
        head, required, names = message.partition("the following arguments are required: ")
        if required:
            message = head + required + ", ".join(self.flag_names.get(n, n) for n in names.split(", "))
        super().error(message, ex)


def _unwrap(tp: Any) -> Any:
    """``T | None`` -> ``T``; anything else as it is."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it), read by docstring_parser as jsonargparse reads it."""
    docs = docstring_parser.parse_from_object(cls)
    return {p.arg_name: " ".join((p.description or "").split()) for p in docs.params}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@dataclass
class _Flag:
    """One field of the config as the parser sees it."""

    field: dataclasses.Field
    type: Any  #: the field's type, ``T | None`` unwrapped
    doc: str
    group: str | None = None  #: the help section: a dataclass-typed field's type's docstring

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.field.metadata)

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.type) in (list, tuple)

    @property
    def names(self) -> tuple[str, ...]:
        if self.meta.get("positional"):
            return (self.field.name,)
        return self.meta.get("flag") or (f"--{self.field.name.replace('_', '-')}",)

    @property
    def usage(self) -> str:
        """How a positional argument shows in the usage line: ``NAME``, ``[NAME]``, ``EXP [EXP ...]``."""
        name = self.field.name.upper()
        if self.is_list:
            return f"{name} [{name} ...]"
        return f"[{name}]" if _default(self.field) is not dataclasses.MISSING else name

    def arguments(self) -> tuple[tuple[str, ...], dict[str, Any]]:
        """The option strings and `add_argument` keywords of the flag."""
        meta, default = self.meta, _default(self.field)
        extra = {k: v for k, v in meta.items() if k not in ("flag", "positional", "repeat", "cli")}
        kwargs: dict[str, Any] = {"help": self.doc, **extra}
        if not meta.get("positional"):
            kwargs["dest"] = self.field.name
        if default is not dataclasses.MISSING:
            kwargs["default"] = list(default) if isinstance(default, tuple) else default
        elif not meta.get("positional"):
            kwargs["required"] = True
        if self.type is bool:
            kwargs["action"] = ActionYesNo(no_prefix="no-")
            return self.names, kwargs
        tp = typing.get_args(self.type)[0] if self.is_list else self.type
        if self.is_list and meta.get("repeat"):
            kwargs["action"] = "append"
        elif self.is_list:
            kwargs.setdefault("nargs", "*" if default in ((), []) else "+")
        elif meta.get("positional") and default is not dataclasses.MISSING:
            kwargs["nargs"] = "?"
        if (
            "choices" in kwargs
        ):  # as a Literal: jsonargparse shows and checks the choices as it does a Literal's
            tp = Literal[tuple(kwargs.pop("choices"))]
        if typing.get_origin(tp) is not Literal:
            kwargs.setdefault("metavar", self.names[-1].lstrip("-").replace("-", "_").upper())
        kwargs["type"] = tp  # a None default needs no "| None": errors then name the type the flag takes
        return self.names, kwargs


def _flags(cls: type, group: str | None = None) -> list[_Flag]:
    """The flags of the dataclass ``cls``, a dataclass-typed field contributing its own (in a help section of
    their own, titled by the first line of that dataclass's docstring up to a parenthesis)."""
    hints, docs, out = typing.get_type_hints(cls), _field_docs(cls), []
    for f in dataclasses.fields(cls):
        tp = _unwrap(hints[f.name])
        if not f.metadata.get("cli", True):
            continue
        if dataclasses.is_dataclass(tp):
            title = inspect.cleandoc(tp.__doc__ or f.name).split("\n")[0].split(" (")[0].rstrip(".")
            out += _flags(tp, title)
        else:
            out.append(_Flag(f, tp, docs.get(f.name, ""), group))
    return out


@dataclass
class Command:
    """A verb: its typed config (a dataclass; the module docstring says how its fields become flags) and the
    function that runs it."""

    config: type
    run: Callable[[Any], Any]
    prog: str  #: the verb's own entry point, e.g. ``python -m pumer_lightning.study``
    description: str | None = None  #: default: the config's docstring
    epilog: str | None = None
    overrides: bool = False  #: collect options that are not the verb's own (see the module docstring)

    def parser(self, prog: str | None = None) -> _Parser:
        """The jsonargparse parser of the config's flags."""
        flags = _flags(self.config)
        prog = prog or self.prog
        parser = _Parser(
            prog=prog,
            usage=" ".join([prog, *(fl.usage for fl in flags if fl.meta.get("positional")), "[options]"]),
            description=inspect.cleandoc(self.description or self.config.__doc__ or ""),
            epilog=self.epilog,
            formatter_class=_Formatter,
            allow_abbrev=False,
        )
        parser.flag_names = names = {}
        groups: dict[str | None, Any] = {None: parser}
        for fl in flags:
            if fl.group not in groups:
                groups[fl.group] = parser.add_argument_group(fl.group)
            option_strings, kwargs = fl.arguments()
            groups[fl.group].add_argument(*option_strings, **kwargs)
            names[fl.field.name] = fl.field.name.upper() if fl.meta.get("positional") else option_strings[0]
        return parser

    def options(self) -> dict[str, tuple[str, int | str]]:
        """Every accepted option spelling -> (its flag, how many values it takes: 0, 1 or "+")."""
        out: dict[str, tuple[str, int | str]] = {"-h": ("-h", 0), "--help": ("--help", 0)}
        for fl in _flags(self.config):
            if fl.meta.get("positional"):
                continue
            arity: int | str = (
                0 if fl.type is bool else "+" if fl.is_list and not fl.meta.get("repeat") else 1
            )
            spellings = list(fl.names)
            if fl.type is bool:
                spellings += [f"--no-{n[2:]}" for n in fl.names if n.startswith("--")]
            for name in spellings:
                out.setdefault(name, (name, arity))
                if name.startswith("--"):  # the other spelling: --max_drop for --max-drop, and back
                    out.setdefault("--" + name[2:].replace("-", "_"), (name, arity))
                    out.setdefault("--" + name[2:].replace("_", "-"), (name, arity))
        return out

    def split(self, argv: list[str]) -> tuple[list[str], list[str]]:
        """``argv`` with every flag in its canonical spelling, and (with ``overrides``) the options that are not
        the verb's own, each with its value."""
        options, known, overrides = self.options(), [], []
        i = 0
        while i < len(argv):
            token = argv[i]
            name, eq, value = token.partition("=")
            if token == "--":  # positionals only from here on
                known += argv[i:]
                break
            if not token.startswith("-") or (name not in options and not token.startswith("--")):
                known.append(token)
            elif name in options:
                canonical, arity = options[name]
                if arity == 0 and eq:  # a switch given a value: --fresh=true, --train=false
                    canonical = _switch(canonical, value)
                    eq = value = ""
                known.append(canonical + eq + value)
                if not eq and arity:
                    j = i + 1
                    while j < len(argv) and (arity == "+" or j == i + 1) and not _is_option(argv[j]):
                        j += 1
                    known += argv[i + 1 : j]
                    i = j - 1
            elif self.overrides:
                overrides.append(token)
                if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                    overrides.append(argv[i + 1])
                    i += 1
            else:
                known.append(token)  # jsonargparse refuses it, naming it
            i += 1
        return known, overrides

    def parse(self, argv: list[str] | None = None, prog: str | None = None) -> Any:
        """The config a command line gives; a bad one exits (status 2) with a message naming the flag."""
        argv = list(sys.argv[1:] if argv is None else argv)
        parser = self.parser(prog)
        known, overrides = self.split(argv)
        namespace = parser.parse_args(known)
        command = " ".join([prog or self.prog, shlex.join(argv)]).strip()
        filled = {"command": command, "argv": argv, "overrides": overrides}
        try:
            return _build(self.config, namespace, filled)
        except ValueError as err:
            parser.error(str(err))

    def main(self, argv: list[str] | None = None, prog: str | None = None) -> Any:
        """Parse ``argv`` (default: ``sys.argv[1:]``) and run the verb."""
        return self.run(self.parse(argv, prog))


def _switch(name: str, value: str) -> str:
    """The spelling of the switch ``name`` that a true or false ``value`` means (``--no-train`` for ``--train=false``)."""
    if value.lower() not in ("true", "yes", "false", "no"):
        return f"{name}={value}"  # jsonargparse refuses it, naming the flag
    on = value.lower() in ("true", "yes")
    base = name[len("--no-") :] if name.startswith("--no-") else name[2:]
    negated = name.startswith("--no-")
    return f"--{base}" if on != negated else f"--no-{base}"


def _is_option(token: str) -> bool:
    """Whether ``token`` ends the values of a flag (a negative number is a value)."""
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False


def _build(cls: type, namespace: Any, filled: dict[str, Any]) -> Any:
    """The dataclass ``cls`` from the parsed values (tuple fields get tuples, dataclass fields are built)."""
    hints, values = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        tp = _unwrap(hints[f.name])
        if not f.metadata.get("cli", True):
            if f.name in FILLED:
                values[f.name] = filled[f.name]
        elif dataclasses.is_dataclass(tp):
            values[f.name] = _build(tp, namespace, filled)
        else:
            value = namespace[f.name]
            if typing.get_origin(tp) is tuple and value is not None:
                value = tuple(value)
            elif tp is Path and isinstance(value, str):
                value = Path(value)
            values[f.name] = value
    return cls(**values)
