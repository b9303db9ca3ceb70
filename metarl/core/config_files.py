"""Config files: YAML reading (duplicate keys refused), dotted ``key.sub=value`` overrides, atomic
writing of the resolved config, and :func:`describe`, the one-line-per-key reference of a schema.

Every user mistake is a one-line :class:`~metarl.core.config.ConfigError`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from metarl.core.atomic import atomic_open
from metarl.core.config import (
    _BOUNDS,
    ConfigError,
    T,
    _choices_text,
    _got,
    _kind,
    _plain,
    _type_str,
    from_dict,
    join_key,
    to_dict,
)

_OVERRIDE_FORM = "expected the form key.sub=value"


def is_override(item: str) -> bool:
    """Whether a command-line item is a ``key.sub=value`` override (else a path, which may hold ``=``:
    ``runs/sweeps/s/inner.lr=0.1-seed0/config.yaml``)."""
    return re.match(r"[A-Za-z_][A-Za-z0-9_.]*=", item) is not None


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with ``key.sub=value`` overrides (values parsed as YAML) applied in order."""
    result = _plain(data)
    for item in [overrides] if isinstance(overrides, str) else overrides:
        raw_key, _, raw_value = item.partition("=") if isinstance(item, str) else ("", "", "")
        parts = [p.strip() for p in raw_key.strip().split(".")]
        if not isinstance(item, str) or "=" not in item or not all(parts):
            raise ConfigError(f"malformed override {item!r}; {_OVERRIDE_FORM}")
        if not raw_value.strip():
            raise ConfigError(f"override {item!r} has an empty value; {_OVERRIDE_FORM}")
        try:
            value = yaml.safe_load(raw_value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"override {item!r}: cannot parse value {raw_value!r} as YAML ({problem})") from None
        node = result
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], dict):
                section = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {item!r}: {section!r} is not a section (it is {_got(node[part])})")
            node = node[part]
        node[parts[-1]] = value
    return result


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys in a mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: list[Any] = []
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: '{path}'") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a file: '{path}'") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file '{path}': {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {exc.problem or exc.context or 'syntax error'}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None


def load_config(cls: type[T], path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> T:
    """Read a YAML config file (empty: all defaults), apply overrides and build ``cls``."""
    path = Path(path)
    data = _read_yaml(path)
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {_got(data)}")
    return from_dict(cls, apply_overrides(data or {}, overrides))


def dump_config(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write config ``obj`` as YAML (keys in declaration order) atomically, creating parents."""
    text = yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)
    with atomic_open(path, "w") as fh:
        fh.write(text)


def describe(cls: type, prefix: str = "") -> str:
    """Every dotted key of ``cls``, one per line: ``key: type = default [constraints]  # doc``."""
    if _kind(cls) != "section":
        raise TypeError(f"describe() needs a pydantic model type, got {cls!r}")
    return "\n".join(_describe_lines(cls, prefix, None))


def _describe_lines(cls: Any, prefix: str, instance: Any) -> list[str]:
    """Defaults inside a section come from the section's default instance (``instance``)."""
    lines = []
    for name, field in cls.model_fields.items():
        key, tp, default, shown = join_key(prefix, name), field.annotation, None, " (required)"
        if instance is not None or not field.is_required():
            default = getattr(instance, name) if instance is not None else field.get_default(call_default_factory=True)
            shown = f" = {_fmt_value(default)}"
        if _kind(tp) == "section":
            lines.append(f"{key}: section  # {field.description}")
            lines.extend(_describe_lines(tp, key, default if isinstance(default, tp) else None))
            continue
        rules = field.json_schema_extra or {}
        limits = [f"one of {_choices_text(rules['choices'])}"] if "choices" in rules else []
        limits += [f"{op} {rules[bound]}" for bound, op, _ in _BOUNDS if bound in rules]
        shown += f" [{', '.join(limits)}]" if limits else ""
        lines.append(f"{key}: {_type_str(tp)}{shown}  # {field.description}")
    return lines


def _fmt_value(value: Any) -> str:
    try:
        return json.dumps(_plain(value))
    except (TypeError, ValueError):
        return repr(value)
