"""Options declared once, on a frozen dataclass's fields; flags, spec keys and docs generated from them.

A config class declares each field with :func:`option` (default, help, limits, flag spelling) and
calls :func:`validate` from ``__post_init__``. From that one declaration:

- :func:`add_arguments` / :func:`from_namespace`: argparse flags and the instance they set;
- :func:`to_argv`: an instance back to flags (non-default values only), for a child process;
- :func:`check_mapping` / :func:`from_mapping`: deployment-spec keys, errors naming ``<path>.<key>``;
- :func:`describe`: name, type, default, help and limits of every option (docs, Helm values).

Torch-free and shoal-free on purpose: routers and the cluster CLI import config classes built on it.
Every error is an :class:`OptionError` carrying the field's name as data, so each caller names it
its own way (``EngineConfig.block_size``, ``--block-size``, ``pools.decode.engine.block_size``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping as _AbcMapping
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Iterable, Mapping

_KEY = "shoal.option"


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()  # "no cli_default" (dataclasses.MISSING cannot be a dataclass default)


class OptionError(ValueError):
    """``value`` of option ``field`` is refused: ``str()`` is ``"<where> <message>"``."""

    def __init__(self, where: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{where} {message}" if where else message)
        self.where, self.message, self.field = where, message, field


@dataclass(frozen=True)
class Option:
    """What :func:`option` records in a field's metadata."""

    help: str
    choices: tuple | None = None
    minimum: float | None = None  # value >= minimum
    exclusive_minimum: float | None = None  # value > exclusive_minimum
    maximum: float | None = None  # value <= maximum
    check: tuple[Callable[[Any], bool], str] | None = None  # (predicate, what it asks for, in words)
    flag: str | None = None  # the long flag; default --<name-with-dashes>; a bool gets --no-<...> too
    aliases: tuple[str, ...] = ()  # further spellings, e.g. "-tp"
    cli: bool = True  # False: no flag (e.g. a mapping)
    cli_default: Any = _UNSET  # the flag's default when it differs from the field's (a required field)
    secret: bool = False  # never echo the value in errors or descriptions


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING,
           choices: Iterable | None = None, minimum: float | None = None, exclusive_minimum: float | None = None,
           maximum: float | None = None, check: tuple[Callable[[Any], bool], str] | None = None,
           flag: str | None = None, aliases: Iterable[str] = (), cli: bool = True, cli_default: Any = _UNSET,
           secret: bool = False) -> Any:
    """A dataclass field declaring one option. No ``default``: the field is required."""
    meta = Option(help=help, choices=tuple(choices) if choices is not None else None, minimum=minimum,
                  exclusive_minimum=exclusive_minimum, maximum=maximum, check=check, flag=flag,
                  aliases=tuple(aliases), cli=cli, cli_default=cli_default, secret=secret)
    if flag is not None and not flag.startswith("--"):
        raise ValueError(f"option flag {flag!r} must start with '--'")
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_KEY: meta})


# -- what a field holds ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Kind:
    base: type  # bool, int, float, str, tuple (of ``item``) or Mapping
    optional: bool = False  # None allowed
    item: type | None = None

    @property
    def name(self) -> str:
        text = {tuple: f"list[{getattr(self.item, '__name__', self.item)}]", _AbcMapping: "mapping"}.get(
            self.base, getattr(self.base, "__name__", str(self.base)))
        return f"{text} | None" if self.optional else text


def _kind(hint: Any) -> _Kind:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"an option's type must be one type or one type | None, got {hint}")
        return dataclasses.replace(_kind(rest[0]), optional=len(rest) < len(args))
    if origin is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"a tuple option must be tuple[T, ...], got {hint}")
        return _Kind(tuple, item=args[0])
    if origin in (dict, _AbcMapping) or hint in (dict, Mapping, _AbcMapping):
        return _Kind(_AbcMapping)
    if hint not in (bool, int, float, str):
        raise TypeError(f"an option must be bool, int, float, str, tuple[T, ...] or a Mapping, got {hint}")
    return _Kind(hint)


@dataclass(frozen=True)
class _Field:
    name: str
    kind: _Kind
    opt: Option
    default: Any  # MISSING when required

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.opt.flag or f"--{self.name.replace('_', '-')}",) + self.opt.aliases

    @property
    def parser_default(self) -> Any:
        return self.default if self.opt.cli_default is _UNSET else self.opt.cli_default


@functools.cache
def _fields(cls: type) -> tuple[_Field, ...]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if _KEY not in f.metadata:
            continue
        default = f.default if f.default_factory is MISSING else f.default_factory()
        out.append(_Field(f.name, _kind(hints[f.name]), f.metadata[_KEY], default))
    return tuple(out)


def _field(cls: type, name: str) -> _Field | None:
    return next((f for f in _fields(cls) if f.name == name), None)


# -- checks -----------------------------------------------------------------------------------------

def _fmt(x: Any) -> str:
    return repr(x) if isinstance(x, str) else str(x)


def limits(f: _Field) -> str | None:
    """The limit of ``f``'s values in words (``>= 1``, ``in (0, 1]``, ``one of 'a', 'b'``), or None."""
    o = f.opt
    if o.choices is not None:
        return "one of " + ", ".join(_fmt(c) for c in o.choices)
    low = (f"[{_fmt(o.minimum)}" if o.minimum is not None
           else f"({_fmt(o.exclusive_minimum)}" if o.exclusive_minimum is not None else None)
    if low is not None and o.maximum is not None:
        return f"in {low}, {_fmt(o.maximum)}]"
    if low is not None:
        return (">= " if low[0] == "[" else "> ") + low[1:]
    if o.maximum is not None:
        return f"<= {_fmt(o.maximum)}"
    return o.check[1] if o.check else None


def _type_error(kind: _Kind, value: Any) -> str | None:
    ok: bool
    if value is None:
        ok = kind.optional
    elif kind.base is bool:
        ok = isinstance(value, bool)
    elif kind.base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind.base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind.base is str:
        ok = isinstance(value, str) and bool(value)
    elif kind.base is tuple:
        ok = isinstance(value, tuple) and all(_type_error(_Kind(kind.item), v) is None for v in value)
    else:
        ok = isinstance(value, _AbcMapping)
    if ok:
        return None
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string",
            tuple: f"a list of {'non-empty strings' if kind.item is str else _Kind(kind.item).name + 's'}",
            _AbcMapping: "a mapping"}[kind.base]
    return f"must be {want}{' or null' if kind.optional else ''}"


def complaint(f: _Field, value: Any) -> str | None:
    """Why ``value`` is refused for ``f`` (``"must be >= 1, got 0"``), or None when it is fine."""
    got = "<redacted>" if f.opt.secret else _fmt(value)
    wrong = _type_error(f.kind, value)
    if wrong:
        return f"{wrong}, got {'<redacted>' if f.opt.secret else repr(value)}"
    if value is None:
        return None
    o = f.opt
    ok = ((o.choices is None or value in o.choices)
          and (o.minimum is None or value >= o.minimum)
          and (o.exclusive_minimum is None or value > o.exclusive_minimum)
          and (o.maximum is None or value <= o.maximum))
    if ok and o.choices is None and o.check is not None:
        ok = bool(o.check[0](value))
    return None if ok else f"must be {limits(f)}, got {got}"


def validate(instance: Any) -> None:
    """Check every declared field of ``instance``; call from ``__post_init__`` (after normalizing).
    Raises :class:`OptionError` ``"<Class>.<field> must be ..., got ..."``."""
    cls = type(instance)
    for f in _fields(cls):
        why = complaint(f, getattr(instance, f.name))
        if why:
            raise OptionError(f"{cls.__name__}.{f.name}", why, f.name)


# -- argparse -----------------------------------------------------------------------------------

def add_arguments(parser: Any, cls: type, skip: Iterable[str] = ()) -> None:
    """A flag per declared field of ``cls`` (but ``skip``) on ``parser`` (or an argument group);
    its dest is the field's name, its default the field's (or the declared ``cli_default``)."""
    skip = set(skip)
    taken = {a.dest for a in getattr(parser, "_actions", ())}
    for f in _fields(cls):
        if not f.opt.cli or f.name in skip:
            continue
        if f.name in taken:  # two config classes on one parser must not share a field name
            raise ValueError(f"{cls.__name__}.{f.name}: the parser already has an argument with that dest")
        parser.add_argument(*f.flags, **_argparse_kwargs(f))


def _argparse_kwargs(f: _Field) -> dict:
    kw: dict[str, Any] = {"dest": f.name}
    if f.parser_default is MISSING:
        kw["required"] = True
    else:
        kw["default"] = f.parser_default
    words = f.opt.help.replace("%", "%%")
    bits = [] if f.opt.choices is not None or f.kind.base is bool else [limits(f)]
    default = f.parser_default
    bits.append("required" if default is MISSING
                else "default: <redacted>" if f.opt.secret and default is not None
                else "default: " + " ".join(map(str, default)).replace("%", "%%") if isinstance(default, tuple)
                else "default: %(default)s")
    kw["help"] = f"{words} ({'; '.join(b for b in bits if b)})".lstrip()
    base = f.kind.base
    if base is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif base is tuple:
        kw.update(nargs="+", type=f.kind.item)
    elif base is _AbcMapping:
        raise TypeError(f"option {f.name}: a mapping has no flag; declare it with cli=False")
    else:
        kw["type"] = base
        if f.opt.choices is not None:
            kw["choices"] = f.opt.choices
    if base is not bool and f.opt.choices is None:
        kw["metavar"] = f.flags[0][2:].upper().replace("-", "_")  # named as the flag, not the field
    return kw


def from_namespace(cls: type, ns: argparse.Namespace, **extra: Any) -> Any:
    """``cls`` from the flags :func:`add_arguments` added (those ``ns`` has) and ``extra``;
    a refused value is an :class:`OptionError` naming its flag (``--block-size must be ...``)."""
    kwargs = {f.name: _from_flag(f, getattr(ns, f.name)) for f in _fields(cls)
              if f.opt.cli and hasattr(ns, f.name)}
    kwargs.update(extra)
    try:
        return cls(**kwargs)
    except OptionError as e:
        f = _field(cls, e.field) if e.field else None
        if f is None or e.field in extra or not f.opt.cli:
            raise
        raise OptionError(f.flags[0], e.message, e.field) from None


def _from_flag(f: _Field, value: Any) -> Any:
    return tuple(value) if f.kind.base is tuple and isinstance(value, list) else value


def to_argv(instance: Any, skip: Iterable[str] = ()) -> list[str]:
    """The flags that make :func:`add_arguments`' parser rebuild ``instance``: one per value that
    differs from the flag's default (a required field always)."""
    skip = set(skip)
    argv: list[str] = []
    for f in _fields(type(instance)):
        if not f.opt.cli or f.name in skip:
            continue
        value, flag = getattr(instance, f.name), f.flags[0]
        if f.default is not MISSING and value == f.parser_default:  # a required field: always
            continue
        if f.kind.base is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            raise ValueError(f"{type(instance).__name__}.{f.name} = None has no flag (its default is "
                             f"{f.parser_default!r})")
        elif f.kind.base is tuple:
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


# -- mappings (the deployment spec) ---------------------------------------------------------------

def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def check_mapping(cls: type, data: Any, path: str, what: str | None = None,
                  skip: Iterable[str] = ()) -> dict:
    """``data``'s keys as a dict of ``cls`` fields, each value type- and limit-checked; an
    :class:`OptionError` names ``<path>.<key>``: unknown keys (with a close match), wrong types,
    values out of range. YAML lists become tuples. Unset fields are left out (defaults apply)."""
    if not isinstance(data, _AbcMapping):
        raise OptionError(path, f"must be a mapping, got {type(data).__name__}")
    known = [f.name for f in _fields(cls) if f.name not in set(skip)]
    out = {}
    for key, value in data.items():
        f = _field(cls, key) if key in known else None
        if f is None:
            hint = difflib.get_close_matches(str(key), known, n=1)
            did_you = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise OptionError(_join(path, str(key)), f"is not {what or 'a ' + cls.__name__ + ' field'}{did_you}; "
                              f"known: {', '.join(known)}", str(key))
        if f.kind.base is tuple and isinstance(value, list):
            value = tuple(value)
        why = complaint(f, value)
        if why:
            raise OptionError(_join(path, key), why, key)
        out[key] = value
    return out


def from_mapping(cls: type, data: Any, path: str, what: str | None = None, **extra: Any) -> Any:
    """``cls`` from a spec mapping (see :func:`check_mapping`) and ``extra``; errors of ``cls``'s
    own checks are re-raised naming ``<path>.<field>`` too."""
    kwargs = {**check_mapping(cls, data, path, what, skip=extra), **extra}
    try:
        return cls(**kwargs)
    except OptionError as e:
        if not e.field or e.field in extra:
            raise
        raise OptionError(_join(path, e.field), e.message, e.field) from None


# -- description ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class OptionInfo:
    """One option as docs and generated schemas see it."""

    name: str
    type: str  # "int", "float | None", "list[str]", "mapping", ...
    default: Any  # None with required=True when the field has none; cli_default is the flag's then
    help: str
    required: bool
    flags: tuple[str, ...]  # () when it has no flag; a bool's also has --no-<flag>
    cli_default: Any
    choices: tuple | None
    minimum: float | None
    exclusive_minimum: float | None
    maximum: float | None
    check: str | None  # a custom check, in words
    limits: str | None  # all of the above, in words
    secret: bool


def describe(cls: type) -> tuple[OptionInfo, ...]:
    """Every declared option of ``cls``, in field order."""
    out = []
    for f in _fields(cls):
        o = f.opt
        flags = f.flags if o.cli else ()
        if flags and f.kind.base is bool:
            flags = (flags[0], "--no-" + flags[0][2:], *flags[1:])
        out.append(OptionInfo(
            name=f.name, type=f.kind.name, default=None if f.default is MISSING else f.default, help=o.help,
            required=f.default is MISSING, flags=flags,
            cli_default=f.parser_default if f.parser_default is not MISSING else None,
            choices=o.choices, minimum=o.minimum, exclusive_minimum=o.exclusive_minimum, maximum=o.maximum,
            check=o.check[1] if o.check else None, limits=limits(f), secret=o.secret))
    return tuple(out)


def defaults(cls: type) -> Mapping[str, Any]:
    """Field name -> default (``...`` for a required field) of every declared option."""
    return types.MappingProxyType({f.name: ... if f.default is MISSING else f.default for f in _fields(cls)})
