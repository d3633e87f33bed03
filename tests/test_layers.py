"""The layers point one way: siamese_core never imports pipelines, pipelines has no import cycle, and an import
inside a function is a deliberate lazy import of a heavy library that says why."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The modules an import statement names, relative imports resolved."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _imports(package: str) -> tuple[dict[str, set[str]], list[tuple[Path, int]]]:
    """The module-level import graph of ``package`` (its own modules only; ``if TYPE_CHECKING`` blocks left out),
    and the imports inside functions, as (file, line)."""
    files = sorted((REPO / package).rglob("*.py"))
    modules = {_module(path) for path in files}
    graph: dict[str, set[str]] = {}
    inner = []
    for path in files:
        module, tree = _module(path), ast.parse(path.read_text(encoding="utf-8"))
        top = {id(node) for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)}
        graph[module] = set()
        for node in tree.body:
            if id(node) in top:
                graph[module] |= {t for t in _targets(node, module, path.name == "__init__.py") if t in modules} - {module}
        functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
        inner += sorted({(path, node.lineno) for function in functions for node in ast.walk(function)
                         if isinstance(node, ast.Import | ast.ImportFrom)})
    return graph, inner


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, as the modules around it, or None."""
    state: dict[str, int] = {}
    trail: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        trail.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return trail[trail.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = 2
        trail.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_pipelines_has_no_import_cycle_and_siamese_core_never_imports_pipelines():
    graph, _ = _imports("pipelines")
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    for path in sorted((REPO / "siamese_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                named = _targets(node, _module(path), path.name == "__init__.py")
                assert not any(name.split(".")[0] == "pipelines" for name in named), f"{path}:{node.lineno}"


def test_every_import_inside_a_function_of_pipelines_says_why():
    """A lazy import carries its reason: a comment on its line, or on the line above its group of imports."""
    _, inner = _imports("pipelines")
    silent = []
    for path, line in inner:
        lines = path.read_text(encoding="utf-8").splitlines()
        above = line - 1  # up through the imports (and blank lines) of its group
        while above > 0 and (not lines[above - 1].strip() or lines[above - 1].strip().startswith(("import ", "from "))) \
                and "#" not in lines[above - 1]:
            above -= 1
        if "#" not in lines[line - 1] and not (above > 0 and lines[above - 1].strip().startswith("#")) \
                and "#" not in lines[above - 1]:
            silent.append(f"{path.relative_to(REPO)}:{line}: {lines[line - 1].strip()}")
    assert not silent, "imports inside functions without a reason:\n" + "\n".join(silent)
