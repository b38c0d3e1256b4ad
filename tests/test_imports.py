"""The import graph of tracer's own modules has no cycle: data flows one way (the command line on top,
the IR at the bottom). Every ``import`` counts, module-level and inside functions, since a function-level
import that closes a circle still couples both modules and breaks as soon as it runs during an import."""
from __future__ import annotations

import ast
import itertools
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
# folder -> import name (pyproject's package-dir: op_rules/ installs as tracer.op_rules, ...)
PACKAGES = {"tracer": "tracer", "op_rules": "tracer.op_rules", "emitter": "tracer.emitter", "fixes": "tracer.fixes"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([name, *parts])] = path
    return found


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of imports under ``if TYPE_CHECKING:`` (never executed, so no edge)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ours that one import statement executes (the deepest named module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importing module's package
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    out = set()
    for name in names:
        while name and name not in known:  # "import tracer.x.y" where y is a name: the module is tracer.x
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
                for target in _targets(node, module, path.name == "__init__.py", set(modules)):
                    if target != module:
                        graph.add_edge(module, target, line=f"{path.relative_to(ROOT)}:{node.lineno}")
    return graph


def _describe(graph: nx.DiGraph, cycle: list[str]) -> str:
    hops = zip(cycle, cycle[1:] + cycle[:1])
    return " -> ".join(f"{a} ({graph.edges[a, b]['line']})" for a, b in hops) + f" -> {cycle[0]}"


def test_the_scanner_sees_function_level_and_relative_imports():
    """The graph is only as good as its edges: a known function-level import and the package-dir
    mapping (op_rules/ is tracer.op_rules) must be in it."""
    graph = import_graph()
    assert graph.has_edge("tracer.cli", "tracer.backends")  # inside _convert / _verify_command
    assert graph.has_edge("tracer.op_rules", "tracer.op_rules.registry")
    assert any(n.startswith("tracer.emitter.") for n in graph) and any(n.startswith("tracer.fixes.") for n in graph)
    assert len(graph) > 50 and graph.number_of_edges() > 100


def test_no_import_cycles():
    graph = import_graph()
    tangled = [c for c in nx.strongly_connected_components(graph) if len(c) > 1]
    cycles = sorted(itertools.islice(nx.simple_cycles(graph), 200), key=len)  # a few name every tangle
    assert not cycles, (f"import cycles among {', '.join(sorted(n for c in tangled for n in c))}; the shortest:\n  "
                        + "\n  ".join(_describe(graph, c) for c in cycles[:5]))
