"""Job kinds: one module each (pipeline/kinds/), a table that names them all, a spec package
that imports none of them, and no import circle in the pipeline package."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import pytest

from pipeline.config import JobKind, SpecError, load_spec
from pipeline.kinds import KINDS, load_job

ROOT = Path(__file__).resolve().parent.parent


def import_graph(package: str) -> dict[str, set[str]]:
    """{module: the modules of `package` it imports}, at its top or inside a function
    (a lazy import ties two modules as much as any)."""
    modules = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def reachable(graph: dict[str, set[str]], start: list[str]) -> set[str]:
    seen, todo = set(start), list(start)
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_pipeline_package_has_no_import_circle():
    graph = import_graph("pipeline")
    assert {"pipeline.run", "pipeline.kinds.compare", "pipeline.config.loader"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_spec_imports_no_job_kind():
    graph = import_graph("pipeline")
    spec = [m for m in graph if m.startswith("pipeline.config")]
    jobs = ("pipeline.kinds", "pipeline.run", "pipeline.cli", "pipeline.jobs", "pipeline.train")
    assert not [m for m in reachable(graph, spec) if m.startswith(jobs)]


def test_every_kind_of_the_schema_is_one_module_of_the_table():
    assert set(KINDS) == set(get_args(JobKind))
    for name, kind in KINDS.items():
        assert kind.name == name
        assert kind.run.__module__.startswith("pipeline.kinds."), name
    assert {k for k, kind in KINDS.items() if not kind.trains} == {"preprocess", "evaluate"}


COMPARE = """\
job: {name: v, kind: compare}
compare:
  variants:
    dense: {attention: {pattern: dense}}
    narrow: {attention: {pattern: sliding_window, params: {window: 0}}}
"""


def test_a_kinds_check_is_one_line_at_the_key_that_fails(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(COMPARE)
    with pytest.raises(SpecError) as info:
        load_job(spec)
    assert str(info.value) == (
        f"{spec}:5: compare.variants.narrow.attention.params: sliding_window: window must "
        "be a positive integer, got 0"
    )
    with pytest.raises(SpecError, match=r"compare.variants: a compare job needs at least two"):
        load_job(spec, ["compare.variants={dense: {}}"])
    with pytest.raises(SpecError, match=r"evaluate.models: an evaluate job needs at least one"):
        load_job(None, ["job.kind=evaluate"])


def test_run_job_checks_the_kind_before_anything_starts(tmp_path):
    import ray

    from pipeline.run import run_job

    spec = load_spec(None, ["job.kind=evaluate", f"storage.work_dir={tmp_path}"])  # unchecked
    with pytest.raises(SpecError, match=r"^job attnpipe-job: evaluate.models: an evaluate job"):
        run_job(spec)
    assert not ray.is_initialized() and not any(tmp_path.iterdir())
