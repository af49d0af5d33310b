"""The package's shape: who may import whom, no import cycles between its parts, short functions, light imports."""
import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "biformer"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, ast.Module]:
    return {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts): ast.parse(path.read_text())
            for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str, tree: ast.Module) -> set[str]:
    """Every biformer module that `module` imports, at the top or inside a function."""
    package = module if module.endswith("__init__") else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("biformer")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.startswith("biformer"):
                found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def _part(module: str) -> str:
    """The unit of layering: a subpackage (biformer.ops) or a top-level module (biformer.errors)."""
    return ".".join(module.split(".")[:2])


def test_only_the_command_line_imports_commands():
    offenders = [name for name, tree in _modules().items()
                 if not name.startswith(("biformer.commands", "biformer.cli"))
                 and any(_part(imported) == "biformer.commands" for imported in _imports(name, tree))]
    assert offenders == []


def test_no_import_cycle_between_parts():
    """ops, models, checkpoints, training, analysis, benchmarks, commands and the top-level modules form a DAG
    (imports inside functions count: they are cycles all the same, only postponed)."""
    graph = defaultdict(set)
    for name, tree in _modules().items():
        for imported in _imports(name, tree):
            if _part(imported) != _part(name) and _part(imported) != "biformer.__init__":
                graph[_part(name)].add(_part(imported))
    graph.pop("biformer.__init__", None)  # the package's face: it imports its parts, none imports it

    def cycle_from(node, path):
        for target in graph.get(node, ()):
            if target in path:
                return path[path.index(target):] + [target]
            found = cycle_from(target, path + [target])
            if found:
                return found
        return None

    for start in list(graph):
        assert cycle_from(start, [start]) is None, " -> ".join(cycle_from(start, [start]))
    assert "biformer.benchmarks" not in graph["biformer.analysis"]


def test_no_function_longer_than_80_lines():
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, tree in _modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


@pytest.mark.parametrize("code", [
    "import biformer.ops",
    "from biformer.cli import build_parser; build_parser().format_help()",
])
def test_light_imports_leave_timm_out(code):
    """The op needs torch alone, and `biformer --help` answers without importing timm (seconds)."""
    check = f"import sys; {code}; assert 'timm' not in sys.modules, 'timm was imported'"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_models_register_whichever_is_imported_first():
    for code in ("import biformer, timm", "import timm, biformer", "import biformer.ops; from timm import create_model"):
        check = f"{code}; import timm; assert timm.is_model('biformer_tiny') and timm.is_model('biformer_nano')"
        result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{code}: {result.stderr[-2000:]}"
