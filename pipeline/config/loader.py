"""Loading a job spec: YAML with line numbers, `key.path=value` overrides, presets, and
every problem as one `SpecError` line naming the file, the YAML path and, where it came from
the file, the line.

Precedence, lowest first: the nodes' defaults < a named preset (`model.preset`) < the job
file < `key.path=value` overrides from the command line. Unknown keys are rejected with a
close-match suggestion.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from models.config import FieldError
from pipeline.config.nodes import PRESET_NODES, dotted, suggest
from pipeline.config.schema import JobSpec, all_paths, fields_at
from pipeline.errors import UserError


class SpecError(UserError):
    """A job spec cannot be used; the message is one line naming what and where."""


def load_spec(
    path: str | Path | None, overrides: Sequence[str] = (), check: Check | None = None
) -> JobSpec:
    """Read, merge and validate a job spec. Raises SpecError with one line on bad input.
    `check`: a further check of the valid spec (a job kind's, pipeline/kinds/), whose
    FieldError is placed like the schema's own."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    if path is not None:
        raw, lines = _read_yaml(Path(path))
        origins = {key: f"{source}:{line}" for key, line in lines.items()}
    for item in overrides:
        key = _apply_override(raw, item)
        origins = {k: v for k, v in origins.items() if k[: len(key)] != key}
        origins[key] = f"{source}: override {item!r}" if path is not None else f"override {item!r}"
    return validate_spec(_apply_presets(raw), source, origins, check)


Check = Callable[[JobSpec], None]


def validate_spec(
    raw: dict[str, Any],
    source: str = "<spec>",
    origins: dict[tuple[str, ...], str] | None = None,
    check: Check | None = None,
) -> JobSpec:
    """A JobSpec from an already merged dict (for example, a resolved spec sent to a worker).

    `origins` maps a YAML path to where its value came from (`file:line`, an override).
    """
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_line(*first_error(exc), source, origins or {})) from None
    return checked(spec, check, source, origins) if check is not None else spec


def checked(
    spec: JobSpec,
    check: Check,
    source: str = "<spec>",
    origins: dict[tuple[str, ...], str] | None = None,
) -> JobSpec:
    """`spec` once `check` passes; a FieldError it raises becomes one SpecError line."""
    try:
        check(spec)
    except FieldError as exc:
        raise SpecError(_line(exc.field.split("."), str(exc), source, origins or {})) from None
    return spec


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, not a job spec") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read: {exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a job spec is a mapping of sections, got {type(data).__name__}")
    return data, _line_index(node)


def _line_index(node: yaml.Node | None, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """{YAML path: 1-based line} for every key in the document."""
    index: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, str(key.value))
            index[path] = key.start_mark.line + 1
            index.update(_line_index(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            path = (*prefix, str(i))
            index[path] = value.start_mark.line + 1
            index.update(_line_index(value, path))
    return index


def _apply_override(raw: dict[str, Any], item: str) -> tuple[str, ...]:
    """Set `a.b.c=value` in place and return its path; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise SpecError(f"override {item!r}: expected key.path=value, e.g. training.lr=3e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node: Any = raw
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if isinstance(node, list):  # `data.sources.0.path=...` indexes a list
            if not part.isdigit() or int(part) >= len(node):
                raise SpecError(f"override {item!r}: {where}: no such list item")
            if last:
                node[int(part)] = value
            node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            node = node.setdefault(part, {})
        else:
            raise SpecError(f"override {item!r}: {'.'.join(parts[:i])} is a value, not a section")
    return tuple(parts)


def _apply_presets(raw: dict[str, Any]) -> dict[str, Any]:
    """Expand `preset: NAME` under each preset node: the preset's diff, then the file's keys."""
    merged = dict(raw)
    for node, presets in PRESET_NODES.items():
        section = merged.get(node)
        if isinstance(section, dict) and section.get("preset") in presets:
            merged[node] = {**presets[section["preset"]], **section}
    return merged


# --------------------------------------------------------------------------- errors


def first_error(exc: ValidationError) -> tuple[list[str], str]:
    """The YAML path and the message of the first error of a failed validation."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        # A node's check names its own field; a spec-level check names a full path.
        loc = cause.field.split(".") if "." in cause.field else [*loc, cause.field]
        return loc, str(cause)
    if err["type"] == "extra_forbidden":
        return loc, "unknown key" + _suggest_key(loc)
    return loc, _humanize(err)


def _line(loc: list[str], message: str, source: str, origins: dict[tuple[str, ...], str]) -> str:
    """One line, `where: yaml.path: what is wrong`, where `where` is the file and line, or the
    override, that set the value: the value itself, a key set below it (an override `a.b.c=`
    on a scalar `a.b`), or the closest enclosing section."""
    below = (k for k in origins if k[: len(loc)] == tuple(loc))
    prefixes = (tuple(loc[:n]) for n in range(len(loc), 0, -1))
    where = next((origins[p] for p in (*below, *prefixes) if p in origins), source)
    return f"{where}: {dotted(loc) or '(top level)'}: {message}"


def _humanize(err: dict[str, Any]) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] in ("missing",):
        return "required"
    value = err.get("input")
    if isinstance(value, (dict, list)) or value is None:
        return msg
    shown = repr(value)
    if shown in msg:
        return msg
    return f"{msg} (got {shown if len(shown) <= 60 else shown[:57] + '...'})"


def _suggest_key(loc: Sequence[str]) -> str:
    """A close match among the siblings of an unknown key, else anywhere in the spec."""
    parent, key = loc[:-1], loc[-1]
    local = suggest(key, fields_at(parent), parent)
    if local:
        return local
    paths = all_paths(JobSpec)
    match = difflib.get_close_matches(
        key, list(dict.fromkeys(p[-1] for p in paths)), n=1, cutoff=0.75
    )
    if not match:
        return ""

    def shared(path: tuple[str, ...]) -> int:  # the leaf nearest the unknown key wins
        pairs = zip(path, parent, strict=False)
        return next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(path), len(parent)))

    same_leaf = [p for p in paths if p[-1] == match[0]]
    best = max(same_leaf, key=lambda p: (shared(p), -same_leaf.index(p)))
    return f" (did you mean {'.'.join(best)!r}?)"


def resolved_yaml(spec: JobSpec) -> str:
    """The resolved spec as YAML, as written next to a run and logged to MLflow."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
