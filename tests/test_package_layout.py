"""The package's shape: subpackages whose imports point down, no import circle, and a core that
imports no transformers. Every import counts: module-level, inside functions and under
`TYPE_CHECKING` alike, since each is a dependency a reader has to follow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import hf_zero

PACKAGE = Path(hf_zero.__file__).parent

# Each subpackage may import those below it in this order (and itself); `testing` may import all.
ORDER = ["version", "config", "core", "offload", "hub", "checkpoint", "engine", "integrations", "top", "cli"]


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _imports() -> dict[str, set[str]]:
    """Module -> the hf_zero modules (or packages) it imports, however and wherever it does."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module, is_package = _module_name(path)
        package = module if is_package else module.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] == "hf_zero":
                    targets.add(target)
                    targets.update(f"{target}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == "hf_zero")
        graph[module] = targets
    return {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "top"
    return parts[1]


def test_no_import_circle_between_modules():
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if target.startswith("hf_zero.testing"):
                continue
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_subpackages_import_only_what_lies_below_them():
    wrong = []
    for module, targets in _imports().items():
        layer = _layer(module)
        if layer in ("testing", "kernels", "model_cards"):
            continue
        for target in targets:
            other = _layer(target)
            if other != layer and ORDER.index(other) > ORDER.index(layer):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "dependencies pointing up:\n" + "\n".join(sorted(wrong))


def test_few_modules_directly_under_the_package():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert modules == ["__init__.py", "version.py"]
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert len(modules) + len(packages) <= 16, packages


def test_the_core_and_the_engine_import_no_transformers():
    code = (
        "import sys\n"
        "import hf_zero.core.engine_view, hf_zero.core.flat_group, hf_zero.engine.zero_engine\n"
        "import hf_zero.offload.nvme, hf_zero.checkpoint\n"
        "assert 'transformers' not in sys.modules, sorted(m for m in sys.modules if m.startswith('hf_zero'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_engine_file_is_small_and_no_module_is_long():
    lines = {path: len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert lines[PACKAGE / "engine" / "zero_engine.py"] <= 400
    long = {str(path.relative_to(PACKAGE)): count for path, count in lines.items() if count > 600}
    assert not long, long
