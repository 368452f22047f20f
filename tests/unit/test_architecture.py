"""The architecture, checked: layers import one way, no cycles, modules a reader can hold.

    ops -> graph -> stage tasks -> stages (extract, load, snapshot, marts)
        -> infrastructure (task, runtime, staging, state, checks) -> warehouse -> config -> core

Stages share contracts only through `core`; only a stage's `tasks.py` may use another stage
(the graph's wiring), luigi, or the process-wide connections in `runtime`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"
STAGES = ("extract", "load", "snapshot", "marts")
MAX_LINES = 460
MAX_FUNCTION_IMPORTS = 15


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, top_level: bool = True) -> set[str]:
    """The pipeline modules a file imports (at module level, or inside functions)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    nodes = (
        tree.body if top_level else [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    )
    for node in nodes if top_level else (n for f in nodes for n in ast.walk(f)):
        if isinstance(node, ast.If) and top_level:  # `if TYPE_CHECKING:` imports are not run
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline")}
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] in STAGES:
        return "tasks" if parts[-1] == "tasks" else f"stage {parts[1]}"
    return parts[1]


def test_core_imports_nothing_else_of_the_pipeline() -> None:
    for module, path in MODULES.items():
        if module.startswith("pipeline.core"):
            assert {m for m in imports(path) if not m.startswith("pipeline.core")} == set(), module


def test_warehouse_and_config_sit_below_the_stages() -> None:
    allowed = {"pipeline.warehouse": ("pipeline.core", "pipeline.warehouse")}
    allowed["pipeline.config"] = ("pipeline.core", "pipeline.config")
    for module, path in MODULES.items():
        for prefix, may in allowed.items():
            if module.startswith(prefix):
                bad = {m for m in imports(path) if not m.startswith(may)}
                assert bad == set(), f"{module} imports {bad}"


def test_stages_share_contracts_only_through_core() -> None:
    """A stage's own modules never import another stage, ops, the graph, luigi or runtime."""
    for module, path in MODULES.items():
        kind = layer(module)
        if not kind.startswith("stage "):
            continue
        stage = kind.removeprefix("stage ")
        foreign = {
            m
            for m in imports(path)
            if any(m.startswith(f"pipeline.{s}") for s in STAGES if s != stage)
            or m.startswith(("pipeline.ops", "pipeline.graph", "pipeline.runtime", "pipeline.task"))
        }
        assert foreign == set(), f"{module} imports {foreign}"
        assert "import luigi" not in path.read_text(), f"{module} uses luigi outside tasks.py"


def test_nothing_below_ops_imports_ops_and_nothing_below_the_graph_imports_it() -> None:
    for module, path in MODULES.items():
        if module.startswith(("pipeline.ops", "pipeline.graph")) or module in (
            "pipeline",
            "pipeline.cron",
            "pipeline.__main__",
        ):
            continue
        bad = {m for m in imports(path) if m.startswith(("pipeline.ops", "pipeline.graph"))}
        assert bad == set(), f"{module} imports {bad}"


def test_no_import_cycle() -> None:
    graph = {m: {d for d in imports(p) if d in MODULES and d != m} for m, p in MODULES.items()}
    graph["pipeline"] = set()  # the package's __init__ only re-exports
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_modules_fit_in_a_readers_head() -> None:
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_few_imports_inside_functions() -> None:
    inside = {m: imports(p, top_level=False) for m, p in MODULES.items()}
    count = sum(len(v) for v in inside.values())
    assert count < MAX_FUNCTION_IMPORTS, {m: v for m, v in inside.items() if v}
