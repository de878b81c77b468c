"""The import rules of the layers (README "Layout"), read from every module's AST, imports inside functions
included: kernels/ imports only torch, triton and the standard library; pipelines/ nothing of recsys or serving
(of kernels only the stdlib-only ``kernels.atomic``); recsys/ nothing of serving; a model never loads bundles or
talks to MLflow; and no two of our modules import each other, directly or through others."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "pipelines", "recsys", "serving")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, at any depth of its AST (``from x import y`` counts as x.y when
    x.y is one of our modules, else as x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & MODULES.keys()
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined by ``base`` itself
                found.add(base)
    return found


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}
IMPORTS = {name: imports(path) for name, path in MODULES.items()}


def top(name: str) -> str:
    return name.split(".")[0]


def violations(package: str, allowed) -> list[str]:
    return sorted(f"{mod} imports {imp}" for mod, imps in IMPORTS.items() if top(mod) == package
                  for imp in imps if not allowed(imp))


def test_kernels_import_only_torch_triton_and_the_standard_library():
    allowed = {"kernels", "torch", "triton"} | set(sys.stdlib_module_names)
    assert violations("kernels", lambda m: top(m) in allowed) == []


def test_pipelines_import_nothing_of_recsys_or_serving_and_no_operator():
    assert violations("pipelines", lambda m: top(m) not in ("recsys", "serving", "torch")
                      and (top(m) != "kernels" or m == "kernels.atomic")) == []


def test_recsys_imports_nothing_of_serving():
    assert violations("recsys", lambda m: top(m) != "serving") == []


def test_models_never_load_bundles_or_track():
    bad = sorted(f"{mod} imports {imp}" for mod, imps in IMPORTS.items() if mod.startswith("recsys.models")
                 for imp in imps if imp in ("recsys.bundle", "recsys.tracking", "recsys.run", "recsys.report")
                 or top(imp) == "mlflow")
    assert bad == []


def test_no_import_cycle():
    graph = {mod: {imp for imp in imps if imp in MODULES and imp != mod} for mod, imps in IMPORTS.items()}
    cycles, state = [], {}

    def visit(node, stack):
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
    assert cycles == []


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_parses(package):
    assert any(top(m) == package for m in MODULES)
