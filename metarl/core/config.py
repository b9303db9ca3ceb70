"""Typed, validated experiment configs.

Experiment configs are YAML files mapped onto nested dataclasses.  Every field
of a config dataclass is declared with :func:`option`, which records a one-line
``doc`` and optional constraints (``choices``, ``ge``, ``gt``, ``le``, ``lt``).
Nested sections are dataclass-typed fields declared with ``default_factory``::

    @dataclass
    class Outer:
        lr: float = option(1e-3, doc="Meta learning rate.", gt=0)
        optimizer: Literal["adam", "sgd"] = option("adam", doc="Meta optimizer.")

    @dataclass
    class Config:
        seed: int = option(0, doc="Random seed.")
        outer: Outer = option(default_factory=Outer, doc="Outer loop.")

    cfg = load_config(Config, "exp.yaml", ["outer.lr=0.01"])

Every user mistake raises :class:`ConfigError` with a single-line message that
names the dotted key (``outer.lr``) and says what is valid.  Mistakes in the
schema itself (a missing ``doc``, an unsupported annotation) are programming
errors and raise ``TypeError``.

Conventions
-----------
* Accepted value types: ``int`` (not bool, not float), ``float`` (int is
  converted; strings in exponent notation such as ``'1e-3'``, which PyYAML
  reads as strings, are converted too), ``bool`` (only true/false), ``str``,
  ``Literal[...]``, ``list[T]``, ``tuple[T, ...]``, ``tuple[A, B]``
  (YAML lists; tuple annotations produce tuples), unions such as
  ``float | list[float]`` or ``X | None`` (members tried in order), nested
  dataclasses, ``dict[str, T]`` and ``dict[str, Any]``/``Any`` (passed through).
* Constraints ``ge/gt/le/lt`` and ``choices`` apply to the value, and to
  every element when the value is a list/tuple (``inner.lr[1]: must be > 0,
  got -1.0``).  ``None`` is never range-checked.
* Cross-field checks: after building a section, :func:`from_dict` calls its
  ``validate`` method if present.  If ``validate`` takes an argument it
  receives the section's dotted prefix (``""`` at top level, ``"outer"`` for the
  ``outer`` section); use :func:`field_error` to build an error naming a key::

      def validate(self, prefix: str = "") -> None:
          if self.lr_range[0] > self.lr_range[1]:
              raise field_error(prefix, "lr_range", "low must be <= high")

  A plain ``ValueError`` raised by ``validate`` (or ``__post_init__``) is
  converted to ``ConfigError("<prefix>: <message>")``.
* Absent keys take their declared default; absent keys without a default
  are an error.  A section given partially is overlaid on the section's
  default instance, so ``option(default_factory=lambda: Outer(lr=1e-3), ...)``
  keeps ``lr=1e-3`` when the file sets only ``outer.optimizer``.  Defaults of
  absent sections are trusted and not re-validated.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from metarl.core.atomic import atomic_open

__all__ = [
    "MISSING",
    "ConfigError",
    "apply_overrides",
    "describe",
    "dump_config",
    "field_error",
    "from_dict",
    "join_key",
    "load_config",
    "option",
    "to_dict",
]

MISSING = dataclasses.MISSING
_META_KEY = "metarl.core.config"
_NoneType = type(None)
_FLOAT_STR = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")
_OVERRIDE_FORM = "expected the form key.sub=value"

T = TypeVar("T")


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split("\n")))


class _Mismatch(ConfigError):
    """The value at ``key`` does not have the annotated type (internal)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------
# Schema declaration
# --------------------------------------------------------------------------


def option(
    default: Any = MISSING,
    *,
    doc: str,
    choices: Sequence[Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    default_factory: Any = MISSING,
) -> Any:
    """Declare a config field: a ``dataclasses.field`` carrying a doc and constraints.

    ``doc`` must be a non-empty single line.  ``choices`` restricts the value
    (or each element of a list value) to the given values; ``ge/gt/le/lt``
    bound numeric values (or each numeric element of a list value).  Omit both
    ``default`` and ``default_factory`` for a required key.
    """
    if not isinstance(doc, str) or not doc.strip() or "\n" in doc.strip():
        raise TypeError(f"option(doc=...) must be a non-empty single line, got {doc!r}")
    if default is not MISSING and default_factory is not MISSING:
        raise TypeError("option() takes either a default or a default_factory, not both")
    meta = {
        "doc": doc.strip(),
        "choices": tuple(choices) if choices is not None else None,
        "ge": ge,
        "gt": gt,
        "le": le,
        "lt": lt,
    }
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={_META_KEY: meta}
    )


def join_key(prefix: str, name: str) -> str:
    """Return the dotted key of ``name`` inside section ``prefix`` (``""`` = top level)."""
    return f"{prefix}.{name}" if prefix else name


def field_error(prefix: str, name: str, message: str) -> ConfigError:
    """Build ``ConfigError("<prefix>.<name>: <message>")`` for use in ``validate()``."""
    return ConfigError(f"{join_key(prefix, name)}: {message}")


def _meta(f: dataclasses.Field) -> dict[str, Any]:
    return f.metadata.get(_META_KEY, {})


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


def _default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()


# --------------------------------------------------------------------------
# Human-readable descriptions
# --------------------------------------------------------------------------


def _got(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _join_or(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _choices_text(choices: Sequence[Any]) -> str:
    return ", ".join(repr(c) for c in choices)


def _desc(tp: Any) -> str:
    """Describe the accepted form of ``tp`` with an article ('a float')."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if tp is _NoneType or tp is None:
        return "null"
    if tp is bool:
        return "a bool (true/false)"
    if tp is int:
        return "an int"
    if tp is float:
        return "a float"
    if tp is str:
        return "a string"
    if origin is Literal:
        return repr(args[0]) if len(args) == 1 else f"one of {_choices_text(args)}"
    if _is_union(tp):
        return _join_or([_desc(a) for a in args])
    if origin in (list, tuple) or tp in (list, tuple):
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(set(args)) == 1:
                return f"a list of {len(args)} {_plural(args[0])}"
            return f"a list of {len(args)} items ({', '.join(_desc(a) for a in args)})"
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        if len(args) == 2 and args[1] is not Any:
            return f"a mapping of strings to {_plural(args[1])}"
        return "a mapping"
    if _is_dataclass_type(tp):
        keys = ", ".join(f.name for f in _fields(tp))
        return f"a mapping (section with keys {keys})"
    if isinstance(tp, type):
        return f"a {tp.__name__}"
    return str(tp)


def _plural(tp: Any) -> str:
    """Describe many values of ``tp`` ('floats')."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    simple = {bool: "bools", int: "ints", float: "floats", str: "strings", _NoneType: "nulls"}
    if tp in simple:
        return simple[tp]
    if tp is Any:
        return "values"
    if origin is Literal:
        return f"values from {_choices_text(args)}"
    if origin in (list, tuple) or tp in (list, tuple):
        return "lists"
    if origin is dict or tp is dict or _is_dataclass_type(tp):
        return "mappings"
    return f"values of type {_type_str(tp)}"


def _type_str(tp: Any) -> str:
    """Render an annotation compactly for :func:`describe`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "Any"
    if tp is _NoneType or tp is None:
        return "None"
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if _is_union(tp):
        return " | ".join(_type_str(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        inner = ", ".join("..." if a is Ellipsis else _type_str(a) for a in args)
        return f"{name}[{inner}]"
    if _is_dataclass_type(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _suggest(word: Any, candidates: Sequence[str]) -> str | None:
    if not isinstance(word, str):
        return None
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


# --------------------------------------------------------------------------
# Conversion and validation
# --------------------------------------------------------------------------


def _mismatch(key: str, tp: Any, value: Any) -> _Mismatch:
    return _Mismatch(key, f"{key}: expected {_desc(tp)}, got {_got(value)}")


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return the converted value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if tp is Any:
        return value
    if tp is _NoneType or tp is None:
        if value is None:
            return None
        raise _mismatch(key, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _mismatch(key, tp, value)
    if tp is float:
        if isinstance(value, bool):
            raise _mismatch(key, tp, value)
        if isinstance(value, float):
            return value
        if isinstance(value, int) or (isinstance(value, str) and _FLOAT_STR.fullmatch(value.strip())):
            try:
                return float(value)
            except OverflowError:
                pass
        raise _mismatch(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _mismatch(key, tp, value)
    if origin is Literal:
        for choice in args:
            if type(choice) is type(value) and choice == value:
                return value
        err = _mismatch(key, tp, value)
        hint = _suggest(value, [c for c in args if isinstance(c, str)])
        if hint is not None:
            err = _Mismatch(key, f"{err}; did you mean {hint!r}?")
        raise err
    if _is_union(tp):
        deeper: ConfigError | None = None
        for member in args:
            try:
                return _convert(member, value, key)
            except _Mismatch as exc:
                if exc.key != key and deeper is None:
                    deeper = exc
            except ConfigError as exc:
                if deeper is None:
                    deeper = exc
        # Prefer a specific error from a member whose outer shape matched.
        if deeper is not None:
            raise deeper
        raise _mismatch(key, tp, value)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _mismatch(key, tp, value)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _mismatch(key, tp, value)
            items = [_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            elem = args[0] if args else Any
            items = [_convert(elem, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _mismatch(key, tp, value)
        if len(args) == 2 and args[1] is not Any:
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise _Mismatch(key, f"{key}: keys must be strings, got {_got(k)}")
                out[k] = _convert(args[1], v, join_key(key, k))
            return out
        return dict(value)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _mismatch(key, tp, value)
        return from_dict(tp, value, prefix=key)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _mismatch(key, tp, value)
    raise TypeError(f"unsupported config annotation {tp!r} for key {key!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_constraints(meta: Mapping[str, Any], value: Any, key: str) -> None:
    """Apply ``choices`` and range constraints to a value or to each list element."""
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_constraints(meta, item, f"{key}[{i}]")
        return
    choices = meta.get("choices")
    if choices is not None and not any(type(c) is type(value) and c == value for c in choices):
        msg = f"{key}: must be one of {_choices_text(choices)}, got {value!r}"
        hint = _suggest(value, [c for c in choices if isinstance(c, str)])
        raise ConfigError(f"{msg}; did you mean {hint!r}?" if hint is not None else msg)
    if _is_number(value):
        for name, op, ok in (
            ("ge", ">=", lambda v, b: v >= b),
            ("gt", ">", lambda v, b: v > b),
            ("le", "<=", lambda v, b: v <= b),
            ("lt", "<", lambda v, b: v < b),
        ):
            bound = meta.get(name)
            if bound is not None and not ok(value, bound):
                raise ConfigError(f"{key}: must be {op} {bound}, got {value!r}")


def _unknown_key_error(cls: type, key: Any, prefix: str) -> ConfigError:
    names = [f.name for f in _fields(cls)]
    shown = join_key(prefix, str(key))
    where = f"valid keys under {prefix!r}" if prefix else "valid top-level keys"
    msg = f"unknown key {shown!r}; {where}: {', '.join(names)}"
    hint = _suggest(key, names)
    if hint is not None:
        return ConfigError(f"{msg} (did you mean {hint!r}?)")
    # The key may belong to a nested section (e.g. 'lr' given at top level).
    nested = [k for k in _all_keys(cls) if "." in k and k.rsplit(".", 1)[1] == key]
    if nested:
        return ConfigError(f"{msg} (did you mean {_join_or([repr(k) for k in nested])}?)")
    return ConfigError(msg)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    hints = _hints(cls)
    keys = []
    for f in _fields(cls):
        key = join_key(prefix, f.name)
        keys.append(key)
        if _is_dataclass_type(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], key))
    return keys


@functools.lru_cache(maxsize=None)
def _validate_takes_prefix(cls: type) -> bool:
    try:
        params = list(inspect.signature(cls.validate).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params
    )


def _reraise_as_config_error(exc: ValueError, prefix: str) -> ConfigError:
    if isinstance(exc, ConfigError):
        return exc
    return ConfigError(f"{prefix}: {exc}" if prefix else f"invalid config: {exc}")


def from_dict(cls: type[T], data: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build and validate dataclass ``cls`` from a plain mapping (recursively).

    ``prefix`` is the dotted key of this section, used in error messages.
    Raises :class:`ConfigError` for unknown or missing keys, wrong types and
    violated constraints; runs each section's ``validate`` hook (see module
    docstring) after construction.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_dict() needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        where = prefix if prefix else "config"
        raise ConfigError(f"{where}: expected {_desc(cls)}, got {_got(data)}")
    hints = _hints(cls)
    fields = _fields(cls)
    names = {f.name for f in fields}
    for key in data:
        if key not in names:
            raise _unknown_key_error(cls, key, prefix)
    kwargs: dict[str, Any] = {}
    for f in fields:
        key = join_key(prefix, f.name)
        if f.name not in data:
            if not _has_default(f):
                doc = _meta(f).get("doc")
                raise ConfigError(f"missing required key {key!r}" + (f" ({doc})" if doc else ""))
            continue
        value = data[f.name]
        if _is_dataclass_type(hints[f.name]) and isinstance(value, Mapping) and _has_default(f):
            default = _default_of(f)
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                value = _merge_section(type(default), _plain(default), value)
        value = _convert(hints[f.name], value, key)
        _check_constraints(_meta(f), value, key)
        kwargs[f.name] = value
    try:
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if callable(validate):
            if _validate_takes_prefix(cls):
                validate(prefix)
            else:
                validate()
    except ValueError as exc:
        raise _reraise_as_config_error(exc, prefix) from None
    return obj


def _merge_section(cls: type, base: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay ``given`` on ``base`` (the plain dict of a default ``cls`` instance).

    Nested sections are merged recursively; every other key given replaces the
    default value wholesale (``dict`` fields included).
    """
    hints = _hints(cls)
    out = dict(base)
    for key, value in given.items():
        sub = hints.get(key) if isinstance(key, str) else None
        if _is_dataclass_type(sub) and isinstance(out.get(key), Mapping) and isinstance(value, Mapping):
            out[key] = _merge_section(sub, out[key], value)
        else:
            out[key] = value
    return out


def to_dict(obj: Any) -> dict[str, Any]:
    """Convert a config dataclass instance to a plain, YAML-serialisable dict.

    Fields keep their declaration order; tuples become lists.  The result
    round-trips through :func:`from_dict`.
    """
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise TypeError(f"to_dict() needs a dataclass instance, got {obj!r}")
    return _plain(obj)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in _fields(type(value))}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------
# Overrides, loading and dumping
# --------------------------------------------------------------------------


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key.sub=value`` overrides applied in order.

    Values are parsed with ``yaml.safe_load`` (``3`` int, ``0.1`` float,
    ``[1,2]`` list, ``true`` bool, ``auto`` str, ``null`` None).  Intermediate
    sections are created as needed; unknown keys are left for
    :func:`from_dict` to report.  The input is not mutated.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    result = _deep_copy(data)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"malformed override {item!r}; {_OVERRIDE_FORM}")
        raw_key, raw_value = item.split("=", 1)
        key = raw_key.strip()
        parts = key.split(".")
        if not key or any(not p.strip() for p in parts):
            raise ConfigError(f"malformed override {item!r}; {_OVERRIDE_FORM}")
        parts = [p.strip() for p in parts]
        if not raw_value.strip():
            raise ConfigError(f"override {item!r} has an empty value; {_OVERRIDE_FORM}")
        try:
            value = yaml.safe_load(raw_value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(
                f"override {item!r}: cannot parse value {raw_value!r} as YAML ({problem})"
            ) from None
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                section = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {item!r}: {section!r} is not a section (it is {_got(child)})"
                )
            node = child
        node[parts[-1]] = value
    return result


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys in a mapping."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: '{path}'") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a file: '{path}'") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot read config file '{path}': {reason}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None


def load_config(cls: type[T], path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> T:
    """Read a YAML config file, apply overrides and build/validate ``cls``.

    An empty file means "all defaults".  Raises :class:`ConfigError` for a
    missing or unreadable file, invalid YAML (with file:line:column), a top
    level that is not a mapping, malformed overrides and invalid values.
    """
    path = Path(path)
    data = _read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, got {_got(data)}"
        )
    return from_dict(cls, apply_overrides(data, overrides))


def dump_config(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write config ``obj`` as YAML (keys in declaration order), atomically.

    The text goes to a temporary file in the target directory, which is then
    moved over ``path`` with ``os.replace``; parent directories are created.
    """
    text = yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)
    with atomic_open(path, "w") as fh:
        fh.write(text)


# --------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------


def _fmt_value(value: Any) -> str:
    try:
        return json.dumps(_plain(value))
    except (TypeError, ValueError):
        return repr(value)


def _constraint_text(meta: Mapping[str, Any]) -> str:
    parts = []
    if meta.get("choices") is not None:
        parts.append(f"one of {_choices_text(meta['choices'])}")
    for name, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if meta.get(name) is not None:
            parts.append(f"{op} {meta[name]}")
    return ", ".join(parts)


def describe(cls: type, prefix: str = "") -> str:
    """List every dotted key of ``cls``: one line each with type, default and doc.

    Line format: ``key: type = default [constraints]  # doc``; required keys
    show ``(required)`` instead of a default; sections show ``section``.
    Defaults inside a section come from the section's default instance (so a
    ``default_factory=lambda: Outer(lr=1e-3)`` shows ``outer.lr ... = 0.001``).
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"describe() needs a dataclass type, got {cls!r}")
    return "\n".join(_describe_lines(cls, prefix, None))


def _describe_lines(cls: type, prefix: str, instance: Any) -> list[str]:
    hints = _hints(cls)
    lines = []
    for f in _fields(cls):
        key = join_key(prefix, f.name)
        tp = hints[f.name]
        meta = _meta(f)
        doc = meta.get("doc", "")
        if instance is not None:
            has_default, default = True, getattr(instance, f.name)
        elif _has_default(f):
            has_default, default = True, _default_of(f)
        else:
            has_default, default = False, None
        if _is_dataclass_type(tp):
            lines.append(f"{key}: section  # {doc}")
            sub = default if isinstance(default, tp) else None
            lines.extend(_describe_lines(tp, key, sub))
            continue
        line = f"{key}: {_type_str(tp)}"
        line += f" = {_fmt_value(default)}" if has_default else " (required)"
        constraints = _constraint_text(meta)
        if constraints:
            line += f" [{constraints}]"
        lines.append(f"{line}  # {doc}")
    return lines
