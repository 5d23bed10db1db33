"""The three layers import only downwards, the tools have no import cycle, and `import tome` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

import pytest

import tome

PACKAGE = Path(tome.__file__).parent
LOWER_LAYERS = ["merge.py", "_methods.py", "_schedule.py", "_dense.py", "patch"]
# Compatibility modules with the original release's names: tome.vis (make_visualization) and
# tome.utils (parse_r and friends, plus benchmark). Lower layers do not use them.
ROOT_COMPAT = ("tome.vis", "tome.utils")
TOOLS = PACKAGE / "tools"
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Iterator[str]:
    """Every module ``path`` imports, at the top or inside functions, relative imports resolved.

    ``from package import name`` yields ``package.name`` too when that is a module of tome.
    """
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)[: -node.level]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield base
            for alias in node.names:
                if _path_of(f"{base}.{alias.name}") is not None:
                    yield f"{base}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name


def _path_of(module: str) -> Optional[Path]:
    """The file of a module or package of tome, or None."""
    parts = module.split(".")
    if parts[0] != "tome":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py") if len(parts) > 1 else None, base / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _files_below_the_tools() -> List[Path]:
    return [path for path in sorted(PACKAGE.rglob("*.py"))
            if TOOLS not in path.parents and path.name != "cli.py"]


def test_nothing_below_the_tools_imports_them():
    # Root modules (tome/__init__.py, utils.py, vis.py, export.py, ...), tome.merge, tome.patch and
    # tome.data: not even lazily, inside a function.
    files = _files_below_the_tools()
    assert PACKAGE / "__init__.py" in files and PACKAGE / "utils.py" in files and PACKAGE / "vis.py" in files
    assert any("patch" in path.parts for path in files) and any("data" in path.parts for path in files)
    for path in files:
        for module in _imports(path):
            assert not module.startswith(("tome.tools", "tome.cli")), f"{path.relative_to(PACKAGE)} imports {module}"


def test_algorithm_and_integrations_never_import_the_compatibility_modules():
    files = []
    for name in LOWER_LAYERS:
        target = PACKAGE / name
        files += sorted(target.rglob("*.py")) if target.is_dir() else ([target] if target.exists() else [])
    assert files
    for path in files:
        for module in _imports(path):
            # by module name: tome.visual_tokens is not tome.vis
            assert not any(module == name or module.startswith(name + ".") for name in ROOT_COMPAT), \
                f"{path.name} imports {module}"


def _tools_graph() -> Dict[str, Set[str]]:
    """Module -> the tools modules it imports (with their parent packages, which import first)."""
    graph: Dict[str, Set[str]] = {}
    for path in sorted(TOOLS.rglob("*.py")):
        name = _module_name(path)
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        targets = set()
        for module in _imports(path):
            if not module.startswith("tome.tools.") or _path_of(module) is None:
                continue
            parts = module.split(".")
            for i in range(3, len(parts) + 1):  # the package chain tome.tools.x, tome.tools.x.y, ...
                prefix = ".".join(parts[:i])
                if prefix != name and prefix not in ancestors:
                    targets.add(prefix)
        graph[name] = targets
    return graph


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle of ``graph`` as a path ``[a, b, ..., a]``, or [] if there is none."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_tools_have_no_import_cycle():
    graph = _tools_graph()
    assert "tome.tools._common" in graph and "tome.tools.train" in graph and graph["tome.tools.demo"]
    cycle = _cycle(graph)
    assert not cycle, "import cycle in tome.tools: " + " -> ".join(cycle)


def _function_lengths(path: Path) -> Iterator[tuple]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


# Known exceptions, each with the issue that removes it (none today: the diffusion block registry
# of issue 27 split the `diffusers` function).
LONG_FUNCTION_EXCEPTIONS: set = set()


def test_functions_are_short():
    # Every module of the package (algorithm, integrations, data, tools, CLI): one job per function.
    files = [path for path in sorted(PACKAGE.rglob("*.py"))
             if path.relative_to(PACKAGE).as_posix() not in LONG_FUNCTION_EXCEPTIONS]
    assert TOOLS / "benchmark.py" in files and PACKAGE / "merge.py" in files and PACKAGE / "patch" / "_lifecycle.py" in files
    long = [f"{path.relative_to(PACKAGE)}:{line} {name} ({lines} lines)"
            for path in files for name, line, lines in _function_lengths(path) if lines > MAX_FUNCTION_LINES]
    assert not long, long


def test_the_length_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    path = tmp_path / "long.py"
    path.write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert [(name, lines) for name, _, lines in _function_lengths(path)] == [("short", 2), ("long", MAX_FUNCTION_LINES + 1)]


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


def test_original_module_names_resolve_without_the_tools():
    code = (
        "import sys, tome; "
        "names = [tome.vis.make_visualization.__name__, tome.utils.benchmark.__name__, tome.make_visualization.__name__]; "
        "print(*names, 'tome.tools' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "make_visualization benchmark make_visualization False"


@pytest.mark.parametrize("name", ["tome.tools.benchmark", "tome.tools.visualize"])
def test_the_tools_use_the_root_implementations(name):
    # One implementation each: the tools' names are the root modules' functions.
    import importlib

    tools = importlib.import_module(name)
    if name.endswith("benchmark"):
        assert tools.benchmark is tome.utils.benchmark
    else:
        assert tools.make_visualization is tome.vis.make_visualization is tome.make_visualization


def test_tools_read_a_forward_through_the_public_api():
    # Sizes and sources of the last forward come from tome.last_forward, as a user reads them.
    import re

    private_read = re.compile(r"""_tome_info\s*(\[\s*|\.get\(\s*)["'](size|source)["']""")
    files = [*sorted(TOOLS.rglob("*.py")), PACKAGE / "vis.py", PACKAGE / "cli.py"]
    found = [f"{path.relative_to(PACKAGE)}:{number}" for path in files
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if private_read.search(line) and "last_forward" not in line]
    assert not found, found
