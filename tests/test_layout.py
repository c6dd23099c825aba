"""The architecture's rules, checked on the source: imports flow pipelines/benchmarks -> vl_align -> pformer ->
dvlp_common, no module imports itself back (imports inside functions count), and the libraries know nothing of
DeepSpeed or torch.distributed."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dvlp_common", "pformer", "vl_align", "pipelines", "benchmarks")
LAYER = {"dvlp_common": 0, "pformer": 1, "vl_align": 2, "pipelines": 3, "benchmarks": 4}


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(name: str, path: Path) -> set[str]:
    """Every module name ``name`` imports, at any depth of the file, relative imports resolved."""
    found = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        edges = set()
        for target in _imports(name, path):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                edges.add(target)
        graph[name] = edges
    return graph


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles


def test_imports_flow_from_the_app_to_the_libraries():
    upward = [f"{a} -> {b}" for a, targets in _graph().items() for b in targets
              if LAYER[b.split(".")[0]] > LAYER[a.split(".")[0]]]
    assert not upward


@pytest.mark.parametrize("package", ["dvlp_common", "pformer", "vl_align"])
def test_libraries_do_not_know_the_distributed_runtime(package):
    offenders = [str(path.relative_to(ROOT)) for path in (ROOT / package).rglob("*.py")
                 if any(m == "deepspeed" or m.startswith(("deepspeed.", "torch.distributed"))
                        for m in _imports(".".join(path.relative_to(ROOT).with_suffix("").parts), path))]
    assert not offenders
