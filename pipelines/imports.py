"""What a module of this project imports, found by reading its source (imports inside functions
included) and followed through this project's packages: the code a stage depends on, and the
packages a served model needs."""

from __future__ import annotations

import ast
import sys
from functools import cache
from importlib.metadata import packages_distributions, version
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
OWN_PACKAGES = ("pipelines", "siamese_core")
# Files read at run time by a module (not imported): they count as that module's code.
MODULE_DATA = {"pipelines.params": ("pipelines/presets",)}


def _module_file(module: str) -> Path | None:
    """The source file of one of this project's modules (a package's ``__init__.py``), or None."""
    base = PROJECT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def _imports(module: str, source: Path, mtime_ns: int) -> frozenset[str]:
    """Every module name ``source`` imports anywhere in its body, as absolute names."""
    package = module if source.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            origin = ".".join(part for part in (base, node.module or "") if part)
            found.add(origin)
            if origin.split(".")[0] in OWN_PACKAGES:
                found.update(f"{origin}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return frozenset(found)


def closure(module: str) -> tuple[set[str], set[str]]:
    """The modules of ours that importing ``module`` can run (parent packages included), and the
    top-level names of the other modules they import."""
    ours: set[str] = set()
    others: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        for candidate in (name, *parents):
            source = _module_file(candidate)
            if candidate in ours or source is None:
                continue
            ours.add(candidate)
            for imported in _imports(candidate, source, source.stat().st_mtime_ns):
                if imported.split(".")[0] not in OWN_PACKAGES:
                    others.add(imported.split(".")[0])
                elif _module_file(imported) and imported not in ours:
                    todo.append(imported)
    return ours, others


def code_files(module: str) -> list[str]:
    """The project files (relative paths) whose content ``module``'s behaviour depends on: its source,
    the sources of every module of ours it imports, transitively, and the data files they read."""
    ours, _ = closure(module)
    files = {str(_module_file(name).relative_to(PROJECT)) for name in ours}  # type: ignore[union-attr]
    files.update(path for name in ours for path in MODULE_DATA.get(name, ()))
    return sorted(files)


def requirements(module: str) -> list[str]:
    """The installed distributions ``module`` imports, directly or through our modules, pinned to their
    installed versions (``name==version``); the standard library and modules not installed are left out."""
    _, others = closure(module)
    providers = packages_distributions()
    names = {dist for top in others - set(sys.stdlib_module_names) for dist in providers.get(top, ())}
    return sorted(f"{name}=={version(name)}" for name in names)
