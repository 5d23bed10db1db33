"""The three layers import only downwards, and `import tome` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tome

PACKAGE = Path(tome.__file__).parent
LOWER_LAYERS = ["merge.py", "_schedule.py", "_dense.py", "patch"]


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
