"""Typed, validated experiment configs: YAML files mapped onto pydantic models.

Sections subclass :class:`ConfigModel` and declare every field with :func:`option` (a one-line
``doc``; optional ``choices``/``ge``/``gt``/``le``/``lt``, checked on the value or on each element
of a list value); a nested section is a model-typed field with a ``default_factory``.  Pydantic
validates in strict mode (unions in its smart mode); a before-validator only reshapes YAML values
(lists to tuples for tuple fields, exponent strings such as ``'1e-3'`` to floats) and overlays a
partial section on the field's default instance.  Cross-field checks are model validators
(``mode="after"``) raising ``field_error("", name, message)`` (``name`` relative to the section)
or a ``ValueError``.  :func:`from_dict` reports pydantic's errors as one-line :class:`ConfigError`
messages naming the dotted key, as a first-failure check would; schema mistakes raise ``TypeError``.
"""

from __future__ import annotations

import difflib
import itertools
import operator
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticUndefined

__all__ = ["MISSING", "ConfigError", "ConfigModel", "field_error", "from_dict", "join_key", "option", "to_dict"]

MISSING: Any = PydanticUndefined
T = TypeVar("T", bound=BaseModel)
_NoneType = type(None)
_FLOAT_STR = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")
_BOUNDS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le), ("lt", "<", operator.lt))
# plain annotation -> how messages describe (one value, many values)
_SIMPLE = {
    bool: ("a bool (true/false)", "bools"),
    int: ("an int", "ints"),
    float: ("a float", "floats"),
    str: ("a string", "strings"),
    _NoneType: ("null", "nulls"),
    Any: ("any value", "values"),
}


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split("\n")))


class _KeyedError(ConfigError):
    """An error about ``key``, relative to the section (or field) whose validator raised it."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key, self.detail = key, detail


def join_key(prefix: str, name: str) -> str:
    """Return the dotted key of ``name`` inside section ``prefix`` (``""`` = top level)."""
    return f"{prefix}.{name}" if prefix else name


def field_error(prefix: str, name: str, message: str) -> ConfigError:
    """Build ``ConfigError("<prefix>.<name>: <message>")``.  In a model validator pass ``prefix=""``:
    the section's dotted key is prepended when the error is reported."""
    return _KeyedError(join_key(prefix, name), message)


def option(
    default: Any = MISSING,
    *,
    doc: str,
    choices: Sequence[Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A ``pydantic.Field`` described by ``doc`` (one line); without a default the key is required."""
    if not isinstance(doc, str) or not doc.strip() or "\n" in doc.strip():
        raise TypeError(f"option(doc=...) must be a non-empty single line, got {doc!r}")
    if default is not MISSING and default_factory is not None:
        raise TypeError("option() takes either a default or a default_factory, not both")
    rules = {"choices": None if choices is None else list(choices), "ge": ge, "gt": gt, "le": le, "lt": lt}
    rules = {name: value for name, value in rules.items() if value is not None}
    factory = {} if default_factory is None else {"default_factory": default_factory}
    return Field(default, description=doc.strip(), json_schema_extra=rules or None, **factory)


def _kind(tp: Any) -> str:
    """Classify an annotation: section, union, literal, tuple (fixed length), list, dict or plain."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "section"
    if origin in (Union, types.UnionType, Literal):
        return "literal" if origin is Literal else "union"
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        return "tuple"
    if origin in (list, tuple, dict) or tp in (list, tuple, dict):
        return "dict" if dict in (origin, tp) else "list"
    return "plain"


class ConfigModel(BaseModel):
    """Base of config sections: unknown keys forbidden, strict types, defaults trusted."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)

    @field_validator("*", mode="before")
    @classmethod
    def _reshape_yaml_value(cls, value: Any, info: Any) -> Any:
        field = cls.model_fields[info.field_name]
        if _kind(field.annotation) == "section" and isinstance(value, Mapping) and not field.is_required():
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                value = _overlay(type(default), _plain(default), value)
        return _reshape(field.annotation, value)

    @field_validator("*", mode="after")
    @classmethod
    def _check_constraints(cls, value: Any, info: Any) -> Any:
        _check(cls.model_fields[info.field_name].json_schema_extra or {}, value, "")
        return value


def _overlay(cls: Any, base: dict[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay ``given`` on ``base`` (the plain dict of a ``cls``), nested sections recursively."""
    out = dict(base)
    for key, value in given.items():
        field = cls.model_fields.get(key) if isinstance(key, str) else None
        sub = field.annotation if field is not None else None
        nested = _kind(sub) == "section" and isinstance(out.get(key), Mapping) and isinstance(value, Mapping)
        out[key] = _overlay(sub, out[key], value) if nested else value
    return out


def _reshape(tp: Any, value: Any) -> Any:
    """Give a YAML value the Python shape strict validation of ``tp`` expects (checks nothing)."""
    kind, args = _kind(tp), typing.get_args(tp)
    if tp is float:
        return float(value) if isinstance(value, str) and _FLOAT_STR.fullmatch(value.strip()) else value
    if kind == "union":
        return next((shaped for shaped in (_reshape(m, value) for m in args) if shaped is not value), value)
    if kind == "tuple" and isinstance(value, (list, tuple)):  # a wrong length is left for pydantic to report
        return tuple(map(_reshape, args, value)) if len(value) == len(args) else value
    if kind == "list" and isinstance(value, (list, tuple)):
        items = [_reshape(args[0] if args else Any, v) for v in value]
        return tuple(items) if tuple in (tp, typing.get_origin(tp)) else items
    if kind in ("dict", "section") and isinstance(value, Mapping):
        return {k: _reshape(args[1], v) for k, v in value.items()} if len(args) == 2 else dict(value)
    return value


def _check(rules: Mapping[str, Any], value: Any, suffix: str) -> None:
    """Apply ``choices`` and bounds to a value or to each list element; ``suffix`` locates it."""
    if not rules or value is None:
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check(rules, item, f"{suffix}[{i}]")
        return
    choices = rules.get("choices")
    if choices is not None and not any(type(c) is type(value) and c == value for c in choices):
        message = f"must be one of {_choices_text(choices)}, got {value!r}"
        hint = _suggest(value, choices)
        raise _KeyedError(suffix, f"{message}; did you mean {hint!r}?" if hint is not None else message)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for name, op, ok in _BOUNDS:
            if rules.get(name) is not None and not ok(value, rules[name]):
                raise _KeyedError(suffix, f"must be {op} {rules[name]}, got {value!r}")


def _got(value: Any) -> str:
    text = repr(value)
    return "null" if value is None else f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def _join_or(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _choices_text(choices: Sequence[Any]) -> str:
    return ", ".join(repr(c) for c in choices)


def _suggest(word: Any, candidates: Sequence[Any]) -> str | None:
    strings = [c for c in candidates if isinstance(c, str)]
    match = difflib.get_close_matches(word, strings, n=1, cutoff=0.6) if isinstance(word, str) else []
    return match[0] if match else None


def _desc(tp: Any, many: bool = False) -> str:
    """Describe the accepted form of ``tp``: one value ('a float') or, ``many``, several ('floats')."""
    kind, args = _kind(tp), typing.get_args(tp)
    if tp in _SIMPLE or tp is None:
        return _SIMPLE[_NoneType if tp is None else tp][many]
    if many:
        plural = {"literal": f"values from {_choices_text(args)}", "list": "lists", "tuple": "lists"}
        return plural.get(kind) or ("mappings" if kind in ("dict", "section") else f"values of type {_type_str(tp)}")
    if kind == "literal":
        return repr(args[0]) if len(args) == 1 else f"one of {_choices_text(args)}"
    if kind == "union":
        return _join_or([_desc(a) for a in args])
    if kind == "tuple":
        items = _desc(args[0], True) if len(set(args)) == 1 else f"items ({', '.join(_desc(a) for a in args)})"
        return f"a list of {len(args)} {items}"
    if kind == "list":
        return f"a list of {_desc(args[0], True)}" if args else "a list"
    if kind == "section":
        return f"a mapping (section with keys {', '.join(tp.model_fields)})"
    if kind == "dict":
        typed = len(args) == 2 and args[1] is not Any
        return f"a mapping of strings to {_desc(args[1], True)}" if typed else "a mapping"
    return f"a {tp.__name__}" if isinstance(tp, type) else str(tp)


def _mismatch(key: str, tp: Any, value: Any) -> str:
    message = f"{key}: expected {_desc(tp)}, got {_got(value)}"
    hint = _suggest(value, typing.get_args(tp)) if _kind(tp) == "literal" else None
    return message if hint is None else f"{message}; did you mean {hint!r}?"


def _all_keys(cls: Any, prefix: str = "") -> Iterator[str]:
    for name, field in cls.model_fields.items():
        yield join_key(prefix, name)
        if _kind(field.annotation) == "section":
            yield from _all_keys(field.annotation, join_key(prefix, name))


def _unknown_key(cls: Any, key: Any, prefix: str) -> str:
    names = list(cls.model_fields)
    where = f"valid keys under {prefix!r}" if prefix else "valid top-level keys"
    message = f"unknown key {join_key(prefix, str(key))!r}; {where}: {', '.join(names)}"
    hint = _suggest(key, names)
    if hint is not None:
        return f"{message} (did you mean {hint!r}?)"
    # The key may belong to a nested section (e.g. 'lr' given at top level).
    nested = [repr(k) for k in _all_keys(cls) if "." in k and k.rsplit(".", 1)[1] == key]
    return f"{message} (did you mean {_join_or(nested)}?)" if nested else message


def _report(errors: list[Any], n: int, tp: Any, key: str) -> tuple[str, bool]:
    """The message for pydantic ``errors`` at or below ``loc[:n]`` (a ``tp`` value at ``key``), chosen as
    a first-failure check would: unknown keys, fields in order, validators.  The flag marks a type
    mismatch of the value itself, on which a union tries its next member."""
    here = [e for e in errors if len(e["loc"]) == n]
    if here and here[0]["type"] not in ("value_error", "assertion_error"):
        return _mismatch(key, tp, here[0]["input"]), True
    if here:  # raised by a validator: constraints, model validators
        exc = here[0].get("ctx", {}).get("error")
        if isinstance(exc, _KeyedError):
            where = key + exc.key if exc.key.startswith("[") else join_key(key, exc.key) if exc.key else key
            return f"{where}: {exc.detail}", False
        text = str(exc) if exc is not None else here[0]["msg"]
        return text if isinstance(exc, ConfigError) else f"{key}: {text}" if key else f"invalid config: {text}", False
    members = [a for a in typing.get_args(tp) if a is not _NoneType] if _kind(tp) == "union" else [tp]
    if len(members) > 1:  # pydantic tags each member's errors; all members failed, in order
        groups = [list(g) for _, g in itertools.groupby(errors, key=lambda e: e["loc"][n])]
        for member, group in zip(members, groups):
            message, mismatch = _report(group, n + 1, member, key)
            if not mismatch:
                return message, False
        return _mismatch(key, tp, next((e for e in errors if len(e["loc"]) == n + 1), errors[0])["input"]), True
    tp, first = members[0], errors[0]
    kind, args = _kind(tp), typing.get_args(tp)
    if kind == "section":
        extra = [e for e in errors if e["type"] in ("extra_forbidden", "invalid_key") and len(e["loc"]) == n + 1]
        if extra:
            return _unknown_key(tp, extra[0]["loc"][n], key), False
        names = list(tp.model_fields)
        first = min(errors, key=lambda e: names.index(e["loc"][n]))
        if first["type"] == "missing" and len(first["loc"]) == n + 1:
            doc = tp.model_fields[first["loc"][n]].description
            return f"missing required key {join_key(key, first['loc'][n])!r}" + (f" ({doc})" if doc else ""), False
    part = first["loc"][n]
    if first["loc"][n + 1 :] == ("[key]",):
        return f"{key}: keys must be strings, got {_got(first['input'])}", True
    if kind in ("section", "dict"):
        child = tp.model_fields[part].annotation if kind == "section" else args[1] if len(args) == 2 else Any
    else:
        child = args[part] if kind == "tuple" else args[0] if args else Any
    sub = f"{key}[{part}]" if isinstance(part, int) else join_key(key, str(part))
    return _report([e for e in errors if e["loc"][n] == part], n + 1, child, sub)[0], False


def from_dict(cls: type[T], data: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build and validate ``cls`` from a plain mapping; error keys start with ``prefix``."""
    if _kind(cls) != "section":
        raise TypeError(f"from_dict() needs a pydantic model type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected {_desc(cls)}, got {_got(data)}")
    try:
        return cls.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_report(exc.errors(), 0, cls, prefix)[0]) from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A plain, YAML-serialisable dict of config ``obj``: declaration order, tuples as lists."""
    if not isinstance(obj, BaseModel):
        raise TypeError(f"to_dict() needs a pydantic model instance, got {obj!r}")
    return _plain(obj)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _type_str(tp: Any) -> str:
    """Render an annotation compactly for :func:`describe`."""
    kind, origin, args = _kind(tp), typing.get_origin(tp), typing.get_args(tp)
    if tp in (Any, None, _NoneType):
        return "Any" if tp is Any else "None"
    if kind in ("literal", "union"):
        return " | ".join(repr(a) if kind == "literal" else _type_str(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_str(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return "section" if kind == "section" else getattr(tp, "__name__", str(tp))
