"""Typed validation of parsed YAML against a frozen-dataclass schema, collecting every problem.

A schema is a tree of frozen dataclasses; each field's type (str, int, float, bool, `X | None`,
`tuple[X, ...]`, `dict[str, X]`, a nested dataclass) and its metadata (`spec()`: doc, min, max,
choices, pattern, unit) say what a value may be. Unknown keys are errors (with a "did you mean"),
missing required keys are errors, and validation never stops at the first problem: the caller gets
the object only when there were none. Cross-field rules live in the loader, not here.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import MISSING
from typing import Any

from sandboxd.policy.source import Document, Path, Problem

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(Ki|Mi|Gi|Ti|K|M|G|T|B)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
               "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def spec(default: Any = MISSING, *, doc: str, default_factory: Any = MISSING, **constraints: Any) -> Any:
    """A schema field. constraints: min, max, choices, pattern, unit ("bytes"), nonempty, item_*."""
    md = {"doc": doc, **constraints}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


def parse_size(v: Any) -> int | None:
    """64Mi, 1Gi, 512K (SI) or a plain integer of bytes; None when not a size."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        m = _SIZE_RE.match(v)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    return None


class Validator:
    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.problems: list[Problem] = []
        self.bad_paths: set[Path] = set()

    def error(self, path: Path, reason: str, key: bool = False) -> None:
        self.problems.append(self.doc.problem(path, reason, key))
        self.bad_paths.add(tuple(path))

    # The result is _BAD when the value (or something inside it) was invalid.
    def check(self, tp: Any, value: Any, path: Path, md: dict[str, Any]) -> Any:
        if tp is Any:
            return value   # free-form; the loader checks it against its own rules
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            non_none = [a for a in args if a is not type(None)]
            if value is None:
                return None
            return self.check(non_none[0], value, path, md)
        if value is None:
            self.error(path, f"must not be null ({_describe(tp, md)})")
            return _BAD
        if dataclasses.is_dataclass(tp):
            return self.check_object(tp, value, path, md)
        if origin is tuple:
            if not isinstance(value, list):
                self.error(path, f"expected a list ({_describe(tp, md)}), got {_kind(value)}")
                return _BAD
            if md.get("nonempty") and not value:
                self.error(path, "must not be empty")
            item_md = {k[5:]: v for k, v in md.items() if k.startswith("item_")}
            if "unit" in md:
                item_md.setdefault("unit", md["unit"])
            items = [self.check(args[0], x, path + (i,), item_md) for i, x in enumerate(value)]
            if md.get("unique"):
                seen: dict[Any, int] = {}
                for i, x in enumerate(items):
                    if x is not _BAD and x in seen:
                        self.error(path + (i,), f"duplicate entry {x!r} (also at index {seen[x]})")
                    elif x is not _BAD:
                        seen[x] = i
            return _BAD if any(x is _BAD for x in items) else tuple(items)
        if origin is dict:
            if not isinstance(value, dict):
                self.error(path, f"expected a mapping, got {_kind(value)}")
                return _BAD
            key_md = {k[4:]: v for k, v in md.items() if k.startswith("key_")}
            item_md = {k[5:]: v for k, v in md.items() if k.startswith("item_")}
            out = {}
            for k, x in value.items():
                ok = self.check(args[0], k, path + (k,), key_md)
                out[k] = self.check(args[1], x, path + (k,), item_md)
                if ok is _BAD:
                    out[k] = _BAD
            return _BAD if any(x is _BAD for x in out.values()) else out
        if tp is bool:
            if not isinstance(value, bool):
                self.error(path, f"expected true or false, got {_kind(value)} {value!r}")
                return _BAD
            return value
        if tp is int:
            if md.get("unit") == "bytes":
                n = parse_size(value)
                if n is None:
                    self.error(path, f"expected a size in bytes (an integer, or e.g. 64Mi, 1Gi, 512K), "
                                     f"got {_kind(value)} {value!r}")
                    return _BAD
                value = n
            elif isinstance(value, bool) or not isinstance(value, int):
                self.error(path, f"expected an integer, got {_kind(value)} {value!r}")
                return _BAD
            return self._range(value, path, md)
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.error(path, f"expected a number, got {_kind(value)} {value!r}")
                return _BAD
            return self._range(float(value), path, md)
        if tp is str:
            if not isinstance(value, str):
                hint = ""
                if isinstance(value, bool):
                    hint = " (YAML reads yes/no/on/off as booleans: quote the value)"
                self.error(path, f"expected a string, got {_kind(value)} {value!r}{hint}")
                return _BAD
            if "\0" in value:
                self.error(path, "must not contain NUL")
                return _BAD
            if md.get("nonempty") and not value:
                self.error(path, "must not be empty")
                return _BAD
            if "choices" in md and value not in md["choices"]:
                self.error(path, f"unknown value {value!r} (one of: {', '.join(md['choices'])})")
                return _BAD
            if "pattern" in md and not re.fullmatch(md["pattern"], value):
                self.error(path, f"{value!r} does not match {md.get('pattern_doc', md['pattern'])}")
                return _BAD
            return value
        raise TypeError(f"schema type {tp!r} not supported")  # a bug in the schema, not the file

    def _range(self, v: Any, path: Path, md: dict[str, Any]) -> Any:
        if "choices" in md and v not in md["choices"]:
            self.error(path, f"unknown value {v!r} (one of: {', '.join(map(str, md['choices']))})")
            return _BAD
        if "min" in md and v < md["min"]:
            self.error(path, f"must be at least {md['min']}, got {v}")
            return _BAD
        if "max" in md and v > md["max"]:
            self.error(path, f"must be at most {md['max']}, got {v}")
            return _BAD
        return v

    def check_object(self, cls: Any, value: Any, path: Path, parent_md: dict[str, Any]) -> Any:
        """Returns an instance even when parts were invalid (they get their default, or a zero
        value), so that later checks can still look at the valid parts; `bad_paths` says which
        parts to distrust. Only a value that is not a mapping at all yields _BAD."""
        if not isinstance(value, dict):
            self.error(path, f"expected a mapping with keys {', '.join(_names(cls))}, got {_kind(value)}")
            return _BAD
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        bad = False
        for k in value:
            if k not in fields:
                close = difflib.get_close_matches(k, list(fields), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                self.error(path + (k,), f"unknown key (allowed here: {', '.join(fields)}){hint}",
                           key=True)
                bad = True
        for name, f in fields.items():
            md = dict(f.metadata)
            # A parent's unit applies to the fields of a small value object (e.g. IntLimit).
            if "unit" in parent_md and "unit" not in md:
                md["unit"] = parent_md["unit"]
            if name not in value:
                if f.default is MISSING and f.default_factory is MISSING:
                    self.error(path + (name,), f"missing required key '{name}' ({md.get('doc', '')})")
                    bad = True
                    kwargs[name] = zero(hints[name])
                continue
            v = self.check(hints[name], value[name], path + (name,), md)
            if v is _BAD:
                bad = True
                self.bad_paths.add(tuple(path + (name,)))
                if f.default is MISSING and f.default_factory is MISSING:
                    kwargs[name] = zero(hints[name])
            else:
                kwargs[name] = v
        return cls(**kwargs)


class _Bad:
    def __repr__(self) -> str:
        return "<invalid>"


_BAD = _Bad()


def zero(tp: Any) -> Any:
    """A placeholder of type tp for a required value that was missing or invalid."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return None
    if origin is tuple:
        return ()
    if origin is dict:
        return {}
    if dataclasses.is_dataclass(tp):
        kw = {}
        hints = typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            if f.default is MISSING and f.default_factory is MISSING:
                kw[f.name] = zero(hints[f.name])
        return tp(**kw)
    return {str: "", int: 0, float: 0.0, bool: False}.get(tp)


def validate(cls: Any, doc: Document) -> tuple[Any | None, list[Problem]]:
    """Validate doc.data against dataclass `cls`.

    Returns (instance, problems). With no problems the instance is the validated value. With
    problems it is a partial instance (invalid parts defaulted) for further checks, and
    `problems` is non-empty: never use it as a valid value. `bad_paths(...)` of the same call is
    available through validate_partial().
    """
    obj, problems, _ = validate_partial(cls, doc)
    return (obj if not problems else None), problems


def validate_partial(cls: Any, doc: Document) -> tuple[Any | None, list[Problem], set[Path]]:
    v = Validator(doc)
    out = v.check_object(cls, doc.data, (), {})
    return (None if out is _BAD else out), v.problems, v.bad_paths


def _kind(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _names(cls: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _describe(tp: Any, md: dict[str, Any]) -> str:
    return md.get("doc", getattr(tp, "__name__", str(tp)))


# -- reference documentation from the schema --------------------------------------------------
def reference(cls: Any, prefix: str = "", unit: str | None = None) -> list[tuple[str, str, str, str]]:
    """Rows (key path, type, default, meaning) for every field, nested objects flattened."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        md = dict(f.metadata)
        u = md.get("unit", unit)
        key = f"{prefix}{f.name}"
        inner = _unwrap(tp)
        if f.default is not MISSING:
            default = _fmt_default(f.default)
        elif f.default_factory is not MISSING:
            default = _fmt_default(f.default_factory())
        else:
            default = "required"
        doc = md.get("doc", "")
        extra = []
        if "choices" in md:
            extra.append("one of " + ", ".join(f"`{c}`" for c in md["choices"]))
        if "min" in md:
            extra.append(f"min {md['min']}")
        if "max" in md:
            extra.append(f"max {md['max']}")
        if u == "bytes":
            extra.append("bytes; accepts 64Mi, 1Gi, 512K")
        if extra:
            doc += " (" + "; ".join(extra) + ")"
        rows.append((key, _fmt_type(tp), default, doc))
        if dataclasses.is_dataclass(inner):
            sep = "[]." if typing.get_origin(tp) is tuple else "."
            rows.extend(reference(inner, key + sep, u))
    return rows


def _unwrap(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _unwrap([a for a in args if a is not type(None)][0])
    if origin is tuple:
        return _unwrap(args[0])
    return tp


def _fmt_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_fmt_type(a) for a in args)
    if origin is tuple:
        return f"list of {_fmt_type(args[0])}"
    if origin is dict:
        return f"map {_fmt_type(args[0])} → {_fmt_type(args[1])}"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, "object")


def _fmt_default(v: Any) -> str:
    if dataclasses.is_dataclass(v):
        return "see below"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return "[" + ", ".join(_fmt_default(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt_default(x)}" for k, x in v.items()) + "}"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)
