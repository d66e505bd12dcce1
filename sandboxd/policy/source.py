"""YAML text -> plain data plus where every key came from.

PyYAML's `safe_load` forgets line numbers and silently keeps the last of two duplicate keys. We
compose the node tree instead and convert it ourselves, recording the line and column of every key
and list item under its key path, so that every later check can say "file:line: key.path: reason".
Nothing here knows the schema; it only parses (step 1 of parse / validate / resolve).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[Any, ...]   # key path: str keys and int list indexes


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a policy or config file. Sorted by file, line."""

    file: str
    line: int          # 1-based; 0 when not tied to a line
    column: int        # 1-based; 0 when unknown
    key_path: str      # "limits.memory_bytes.max", "binds_allowed[1].source"; "" for the whole file
    reason: str

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}"
            if self.column:
                where += f":{self.column}"
        key = f" {self.key_path}:" if self.key_path else ""
        return f"{where}:{key} {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "column": self.column,
                "key_path": self.key_path, "reason": self.reason}


def format_path(path: Path) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


@dataclass
class Document:
    """A parsed file: its data and the (line, column) of every key path."""

    file: str
    data: Any
    marks: dict[Path, tuple[int, int]] = field(default_factory=dict)       # where each value starts
    key_marks: dict[Path, tuple[int, int]] = field(default_factory=dict)   # where each key is

    def where(self, path: Path, key: bool = False) -> tuple[int, int]:
        """The mark of `path` (its value, or its key with key=True), or of its nearest ancestor
        that has one (e.g. for a missing key)."""
        p = tuple(path)
        if key and p in self.key_marks:
            return self.key_marks[p]
        while p:
            if p in self.marks:
                return self.marks[p]
            p = p[:-1]
        return self.marks.get((), (1, 1))

    def problem(self, path: Path, reason: str, key: bool = False) -> Problem:
        line, col = self.where(path, key)
        return Problem(self.file, line, col, format_path(path), reason)


MAX_NODES = 100_000


def parse_yaml(text: str, file: str) -> tuple[Document | None, list[Problem]]:
    """Parse one YAML document. Returns (document, problems); document is None on syntax errors."""
    problems: list[Problem] = []
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        reason = " ".join(x for x in (e.context, e.problem) if x) or str(e)
        if "expected a single document" in reason:
            reason = "a file holds exactly one document (remove the '---' separator)"
        return None, [Problem(file, line, col, "", f"YAML syntax: {reason}")]
    except yaml.YAMLError as e:
        return None, [Problem(file, 0, 0, "", f"YAML: {e}")]
    except RecursionError:
        return None, [Problem(file, 1, 1, "", "nested too deeply")]
    finally:
        loader.dispose()
    doc = Document(file, None)
    if node is None:
        return None, [Problem(file, 1, 1, "", "the file is empty")]
    doc.marks[()] = (node.start_mark.line + 1, node.start_mark.column + 1)
    constructor = yaml.SafeLoader("")
    # Aliases make a small text expand into a huge tree ("billion laughs"): bound the number of
    # nodes we are willing to convert.
    budget = [MAX_NODES]

    def convert(n: yaml.Node, path: Path) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise _TooBig
        if isinstance(n, yaml.MappingNode):
            out: dict[str, Any] = {}
            first_line: dict[str, int] = {}
            for knode, vnode in n.value:
                kmark = (knode.start_mark.line + 1, knode.start_mark.column + 1)
                if not isinstance(knode, yaml.ScalarNode):
                    problems.append(Problem(file, *kmark, format_path(path), "a key must be a plain scalar"))
                    continue
                if knode.tag == "tag:yaml.org,2002:merge":
                    problems.append(Problem(file, *kmark, format_path(path),
                                            "YAML merge keys ('<<') are not supported: write the keys out"))
                    continue
                key = scalar(knode, path)
                if not isinstance(key, str):
                    problems.append(Problem(file, *kmark, format_path(path + (str(key),)),
                                            f"a key must be a string, got {type(key).__name__} "
                                            f"(quote it: '{knode.value}')"))
                    continue
                if key in out:
                    problems.append(Problem(file, *kmark, format_path(path + (key,)),
                                            f"duplicate key (first defined on line {first_line[key]})"))
                    continue
                first_line[key] = kmark[0]
                doc.key_marks[path + (key,)] = kmark
                doc.marks[path + (key,)] = (vnode.start_mark.line + 1, vnode.start_mark.column + 1)
                out[key] = convert(vnode, path + (key,))
            return out
        if isinstance(n, yaml.SequenceNode):
            items = []
            for i, item in enumerate(n.value):
                doc.marks[path + (i,)] = (item.start_mark.line + 1, item.start_mark.column + 1)
                items.append(convert(item, path + (i,)))
            return items
        return scalar(n, path)

    def scalar(n: yaml.Node, path: Path) -> Any:
        try:
            return constructor.construct_object(n)
        except yaml.YAMLError as e:
            problems.append(Problem(file, n.start_mark.line + 1, n.start_mark.column + 1,
                                    format_path(path), f"cannot read value: {getattr(e, 'problem', e)}"))
            return None

    try:
        doc.data = convert(node, ())
    except _TooBig:
        return None, [Problem(file, 1, 1, "", f"more than {MAX_NODES} values (alias expansion?); "
                                             "a policy is much smaller than that")]
    except RecursionError:
        return None, [Problem(file, 1, 1, "", "nested too deeply")]
    return doc, problems


class _TooBig(Exception):
    pass
