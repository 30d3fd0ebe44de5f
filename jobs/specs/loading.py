"""Reading spec files: YAML or JSON text to a mapping, ``--set`` overrides, pydantic errors as
``field.path: reason`` lines, and a spec's identity (its run id) and normalized YAML.

Nothing here knows which kinds exist; :mod:`jobs.kinds` validates a mapping as its kind's spec.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from jobs.specs.base import SpecBase, SpecError


def format_error(cls: type[BaseModel], err: Any) -> str:
    loc = tuple(err["loc"])
    if field := (err.get("ctx") or {}).get("field"):
        loc = (*loc, *field.split("."))
    path = ".".join(str(p) for p in loc) or "spec"
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        reason = "unknown field" + _suggest(cls, loc)
    elif kind == "missing":
        reason = "required field is missing"
    elif kind in ("value_error", "assertion_error", "spec_field"):
        reason = msg.split(", ", 1)[1] if msg.startswith(("Value error, ", "Assertion failed, ")) else msg
    else:
        reason = msg
        value = err.get("input")
        if isinstance(value, str | int | float | bool) or value is None:
            reason += f" (got {value!r})"
    return f"{path}: {reason}"


def _suggest(cls: type[BaseModel], loc: tuple[Any, ...]) -> str:
    owner: Any = cls
    for part in loc[:-1]:
        field = owner.model_fields.get(part) if isinstance(part, str) else None
        ann = field.annotation if field else None
        candidates = [ann, *getattr(ann, "__args__", ())]
        owner = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if owner is None:
            return ""
    name, fields = str(loc[-1]), list(owner.model_fields)
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    close = close or [f for f in fields if name in f or f in name]
    return f" (did you mean {close[0]!r}?)" if close else ""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys: YAML would otherwise keep the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_spec_dict(path_or_text: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw mapping of a spec file (YAML or JSON), or of spec text; no validation."""
    source, text = _read(path_or_text)
    if source.lower().endswith(".json") or text.lstrip().startswith("{"):
        # JSON first: YAML rejects some valid JSON (tab indentation) and gives worse messages.
        try:
            data = json.loads(text, object_pairs_hook=_unique_pairs)
        except json.JSONDecodeError as exc:
            if source.lower().endswith(".json"):
                raise SpecError(
                    [f"{source}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"]
                ) from None
        except ValueError as exc:  # a duplicate key
            raise SpecError([f"{source}: {exc}"]) from None
        else:
            if not isinstance(data, dict):
                raise SpecError([f"{source}: expected a mapping of fields at the top level"])
            return data
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([f"{source}: not valid YAML: {problem}{where}"]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{source}: expected a mapping of fields at the top level"])
    return data


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _read(path_or_text: str | os.PathLike[str]) -> tuple[str, str]:
    if isinstance(path_or_text, str) and (
        "\n" in path_or_text or ": " in path_or_text or path_or_text.lstrip().startswith("{")
    ):
        return "spec", path_or_text
    path = Path(path_or_text)
    try:
        return str(path), path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SpecError([f"{path}: cannot read spec: {reason}"]) from None


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``a.b.c=value`` set; values are parsed as YAML (``3`` is an int,
    ``[conv1, conv2]`` a list, ``null`` None). Integer segments index into lists."""
    out = copy.deepcopy(data)
    problems = []
    for item in overrides:
        path, sep, raw = item.partition("=")
        parts = path.strip().split(".")
        if not sep or not all(parts):
            problems.append(f"{item}: expected field.path=value")
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw  # not YAML (e.g. an unbalanced bracket): take it as the literal string
        try:
            _set_path(out, parts, value)
        except (KeyError, IndexError, TypeError) as exc:
            problems.append(f"{path}: cannot set: {exc.args[0]}")
    if problems:
        raise SpecError(problems)
    return out


def _set_path(node: Any, parts: list[str], value: Any) -> None:
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.lstrip("-").isdigit():
                raise TypeError(f"{where} indexes a list; use a number")
            idx = int(part)
            if not -len(node) <= idx < len(node):
                raise IndexError(f"{where} is past the end of a {len(node)}-item list")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise TypeError(f"{'.'.join(parts[:i]) or 'spec'} is a {type(node).__name__}, not a mapping")


def canonical_json(spec: SpecBase) -> str:
    """The spec's identity: its normalized fields, minus where it is stored (output, endpoint_url)
    and the run id itself, as compact sorted JSON."""
    data = spec.model_dump(mode="json", exclude={"run_id", "output", "endpoint_url"})
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def spec_run_id(spec: SpecBase) -> str:
    """``spec.run_id``, or ``{name}-{hash}``: re-running the same spec targets the same run (and so
    no-ops once committed), wherever its output goes."""
    if spec.run_id:
        return spec.run_id
    return f"{spec.name}-{hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:10]}"


def dump_yaml(spec: SpecBase) -> str:
    """The normalized spec as YAML, fields in declaration order with ``kind`` first."""
    data = spec.model_dump(mode="json")
    data = {"kind": data.pop("kind"), **data}
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)
