"""The package's layers point one way, and no module imports itself back.

Every import in every module (function-level ones included) is read with `ast`; a module
may import only from its own layer or a lower one. The order is the one the subpackages'
docstrings state.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "methods", "csl")
# Lowest first. A module belongs to the layer whose longest prefix names it ("=": exactly).
LAYERS = [
    ("foundation", ("=bench", "bench.labels", "bench.suggest", "bench.files")),
    ("contract", ("bench.contract",)),
    ("selectors", ("methods", "csl")),
    ("data", ("bench.data",)),
    ("results", ("bench.results",)),
    ("harness", ("bench.harness",)),
    ("tools", ("bench.tools",)),
    ("orchestration", ("bench.orchestration",)),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            exact = prefix.startswith("=")
            prefix = prefix.lstrip("=")
            if (module == prefix or (not exact and module.startswith(prefix + "."))) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return best[0]


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports (`from a.b import c` counts as a.b.c when that is
    a module, else a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {m: project_imports(p, set(files)) - {m} for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v), on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("bench.results.record") < layer_of("bench.harness.train")
    assert layer_of("bench.labels") < layer_of("bench.contract.selection") < layer_of("methods.fixed")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("bench.elsewhere")


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_imports_point_down_the_layers():
    wrong = [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {i} ({LAYERS[layer_of(i)][0]})"
        for m, imports in import_graph().items()
        for i in imports
        if layer_of(i) > layer_of(m)
    ]
    assert wrong == []


def test_every_subpackage_says_what_it_may_import():
    for package in (ROOT / "bench").iterdir():
        if (package / "__init__.py").is_file():
            doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
            assert doc and "import" in doc.lower(), f"{package.name}/__init__.py should say what it holds and what it may import"


def test_the_training_loop_stays_the_loop():
    """Trainer grew back from 258 to 365 lines once, one piece per feature: anything that is
    not the loop belongs in build, schedule, evaluator, recorder, checkpoint or the seam."""
    tree = ast.parse((ROOT / "bench" / "harness" / "train.py").read_text())
    [trainer] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    assert trainer.end_lineno - trainer.lineno + 1 <= 150
