"""No import cycles among robotrain's modules, counting imports inside functions too (issue 14):
a cycle that only closes at call time still ties the modules' concerns together. Imports under
`if TYPE_CHECKING:` never run and are not counted."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "robotrain"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, name: str, modules: set[str]) -> set[str]:
    """The robotrain modules `path` (module `name`) imports anywhere, as module names."""
    tree = ast.parse(path.read_text())
    type_checking = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # an attribute: the module that defines it
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(edges[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported(path, name, set(paths)) for name, path in paths.items()}


def test_robotrain_modules_import_each_other_without_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(
        " ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in found)


def test_the_check_sees_a_cycle_through_an_import_inside_a_function():
    a = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(a) == [["a", "b", "c"]]
    assert "robotrain.data.reading" in import_graph()["robotrain.data"]  # inside a function there


def test_policies_build_and_load_from_local_folders_only():
    """Downloading a pretrained policy is robotrain.pretrained's job (through robotrain.hub)."""
    graph = import_graph()

    def downloads(module: str) -> bool:
        return module == "robotrain.pretrained" or module.split(".")[:2] == ["robotrain", "hub"]

    assert not {m: sorted(filter(downloads, graph[m]))
                for m in graph if m.startswith("robotrain.policies") and any(map(downloads, graph[m]))}


def test_the_lerobot_format_modules_are_layered():
    """statistics (numpy only) <- metadata <- reading; writing uses metadata and statistics. Reading
    never pulls in the writer (nor the writer the reader), so either can change alone."""
    graph = import_graph()
    data = {m: {d for d in graph[f"robotrain.data.{m}"] if d.startswith("robotrain.data.")}
            for m in ("statistics", "metadata", "reading", "writing")}
    assert data["statistics"] == set()
    assert not data["metadata"] & {"robotrain.data.reading", "robotrain.data.writing"}
    assert "robotrain.data.writing" not in data["reading"] and "robotrain.data.reading" not in data["writing"]
