"""The three layers import only downwards, and `import tome` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tome

PACKAGE = Path(tome.__file__).parent
LOWER_LAYERS = ["merge.py", "_methods.py", "_schedule.py", "_dense.py", "patch"]
# Compatibility modules with the original release's names that belong to the tools layer:
# tome.vis (make_visualization) and tome.utils (parse_r and friends, plus benchmark).
TOOLS_LAYER_ROOT = ("tome.vis", "tome.utils")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            # Resolve relative imports against the module's package.
            if node.level:
                parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)[: -node.level]
                yield ".".join(parts + ([node.module] if node.module else []))
            else:
                yield node.module or ""
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name


def test_algorithm_and_integrations_never_import_tools():
    files = []
    for name in LOWER_LAYERS:
        target = PACKAGE / name
        files += sorted(target.rglob("*.py")) if target.is_dir() else ([target] if target.exists() else [])
    assert files
    for path in files:
        for module in _imports(path):
            assert not module.startswith("tome.tools"), f"{path.name} imports {module}"
            assert not module.startswith("tome.cli"), f"{path.name} imports {module}"
            assert not module.startswith(TOOLS_LAYER_ROOT), f"{path.name} imports {module}"


def _top_level_imports(path: Path):
    """Imports that run when the module is imported (not those inside functions)."""
    tree = ast.parse(path.read_text())
    names = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            names.append(("." * node.level) + (node.module or ""))
            names += [("." * node.level) + alias.name for alias in node.names if not node.module]
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


@pytest.mark.parametrize("name", ["__init__.py", "utils.py"])
def test_root_modules_reach_tools_only_lazily(name):
    # tome/__init__.py (make_visualization) and tome/utils.py (benchmark) keep the original
    # release's names for tools, but import them only when first asked for, inside a function.
    imported = list(_top_level_imports(PACKAGE / name))
    assert imported
    for module in imported:
        assert not any(part in ("tools", "cli", "vis") for part in module.replace(".", " ").split()), (name, module)


def test_algorithm_imports_torch_only():
    for module in _imports(PACKAGE / "merge.py"):
        assert module.split(".")[0] in {"torch", "typing", "math", "__future__"}, module


def test_import_tome_is_light():
    code = (
        "import sys, tome; "
        "heavy = [m for m in ('transformers', 'matplotlib', 'timm', 'torchvision', 'tome.tools') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_original_module_names_resolve_after_import_tome():
    code = "import tome; print(tome.vis.make_visualization.__name__, tome.utils.benchmark.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "make_visualization benchmark"
