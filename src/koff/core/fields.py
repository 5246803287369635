"""The one way koff turns a mapping read from disk or YAML into typed values: every field is
checked for presence, type (a bool is never a number here) and finiteness, and an error names
the file or section and the field at fault.

Two entry points share the checks:
  - `require` / `optional` (and `integer`, `number`, `str_list`) read one field of a manifest;
    their errors are ArtifactErrors ("koff.json: field 'pruned' must be bool, got str 'yes'");
  - `from_mapping` fills a config dataclass (MemoryConfig, TrainConfig) from a YAML section,
    typing each field by its default; its errors are ConfigErrors ("train.steps: expected an
    integer, got 2.5"), and it refuses fields the dataclass does not have.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
from typing import Any, Literal, TypeVar, overload

from koff.core.errors import ArtifactError, ConfigError

T = TypeVar("T")


def short(v: Any) -> str:
    """`repr(v)`, cut to 60 characters (errors must not echo a huge value)."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _names(types) -> str:
    return " or ".join(t.__name__ if t is not type(None) else "null"
                       for t in (types if isinstance(types, tuple) else (types,)))


def typed(v: Any, key: str, types, where: str) -> Any:
    """`v` if it is of `types` (a bool only where bool is allowed) and, if a float, finite."""
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
        raise ArtifactError(f"{where}: field '{key}' must be {_names(types)}, got {type(v).__name__} {short(v)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise ArtifactError(f"{where}: field '{key}' must be a finite number, got {v}")
    return v


def require(obj: dict, key: str, types, where: str) -> Any:
    """`obj[key]`, which must exist and be of `types`."""
    if not isinstance(obj, dict):
        raise ArtifactError(f"{where}: expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise ArtifactError(f"{where}: missing field '{key}'")
    return typed(obj[key], key, types, where)


def optional(obj: dict, key: str, types, where: str, default: Any = None) -> Any:
    """`obj[key]` if present and not null (then of `types`), else `default`."""
    if obj.get(key) is None:
        return default
    return typed(obj[key], key, types, where)


def integer(obj: dict, key: str, where: str, minimum: int | None = None) -> int:
    """A required whole number, at least `minimum`."""
    v = require(obj, key, int, where)
    if minimum is not None and v < minimum:
        raise ArtifactError(f"{where}: field '{key}' must be >= {minimum}, got {v}")
    return v


@overload
def number(obj: dict, key: str, where: str, lo: float | None = None, hi: float | None = None,
           required: Literal[True] = True) -> float: ...


@overload
def number(obj: dict, key: str, where: str, lo: float | None = None, hi: float | None = None, *,
           required: bool) -> float | None: ...


def number(obj: dict, key: str, where: str, lo: float | None = None, hi: float | None = None,
           required: bool = True) -> float | None:
    """A finite number in [lo, hi] (None when optional and absent)."""
    v = require(obj, key, (int, float), where) if required else optional(obj, key, (int, float), where)
    if v is None:
        return None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ArtifactError(f"{where}: field '{key}' must be in [{lo}, {hi}], got {v}")
    return float(v)


def str_list(obj: dict, key: str, where: str, required: bool = True) -> list[str]:
    """A list of strings (an empty list when optional and absent)."""
    v = require(obj, key, list, where) if required else optional(obj, key, list, where, [])
    if not all(isinstance(x, str) for x in v):
        raise ArtifactError(f"{where}: field '{key}' must be a list of strings, got {short(v)}")
    return list(v)


def from_mapping(cls: type[T], raw: Any, where: str) -> T:
    """A `cls` (a dataclass whose fields all have defaults) from a mapping of some of its fields.

    Each value must have the type of the field's default: true/false for a bool, a string for a
    str, a number for a float and a whole number for an int (2.0 is taken as 2). Fields whose
    default is None, a list or a mapping are taken as given; `cls.validate` checks them.
    """
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    out = cls()
    for k, v in raw.items():
        default = getattr(out, k)
        if isinstance(default, bool) and not isinstance(v, bool):
            raise ConfigError(f"{where}.{k}: expected true/false, got {v!r}")
        if isinstance(default, str) and not isinstance(v, str):
            raise ConfigError(f"{where}.{k}: expected a string, got {v!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"{where}.{k}: expected a number, got {v!r}")
            if isinstance(default, int) and isinstance(v, float) and not v.is_integer():
                raise ConfigError(f"{where}.{k}: expected an integer, got {v!r}")
            v = type(default)(v)
        setattr(out, k, v)
    return out


def field_docs(cls: type) -> dict[str, str]:
    """The docstring of each field of a dataclass: the string literal written on the line after
    the field (how koff documents its config fields), by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs
