"""The package's layering, read from the source: no import circles, imports point down the layers only.

Layers, bottom to top: ``kernels`` <- ``model`` <- ``training`` <- ``integrations``. Every
import between the package's own modules counts, at module level or inside a function.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tidar_kernels"
LAYERS = ("kernels", "model", "training", "integrations")
MAX_TOP_LEVEL_MODULES = 6


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_imports(path: Path) -> set:
    """Modules of the package that ``path`` imports anywhere (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("tidar_kernels"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("tidar_kernels"):
                continue
            for alias in node.names:  # "from . import ops" imports a module; "from .ops import f" a name
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _source_of(candidate) is not None else target)
    return {name for name in found if _source_of(name) is not None} - {module}


def _source_of(module: str):
    path = PACKAGE.parent.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _graph() -> dict:
    return {_module_name(path): _package_imports(path) for path in PACKAGE.rglob("*.py")}


def _layer(module: str):
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_import_circle():
    graph = _graph()
    state: dict = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_imports_point_down_the_layers():
    wrong = []
    for module, imports in sorted(_graph().items()):
        mine = _layer(module)
        if mine is None:
            continue
        wrong += [f"{module} imports {other}" for other in sorted(imports)
                  if _layer(other) is not None and _layer(other) > mine]
    assert not wrong, "imports must point down kernels <- model <- training <- integrations:\n" + "\n".join(wrong)


def test_few_plain_modules_at_the_top():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules
