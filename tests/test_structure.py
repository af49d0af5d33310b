"""The package's shape: who may import whom, no import cycles between its parts or inside them, model-name
prefixes only where the tasks declare them, short functions, light imports."""
import ast
import re
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


def _module_graph() -> dict[str, set[str]]:
    """biformer module -> the biformer modules it imports (a package as its __init__), at the top or in a function."""
    modules = {name.removesuffix(".__init__") for name in _modules()}
    graph = defaultdict(set)
    for name, tree in _modules().items():
        imported = {module for module in _imports(name, tree) if module in modules}
        # `from . import x` names the package and its module x: only x is imported
        imported -= {package for package in imported if any(m.startswith(package + ".") for m in imported)}
        graph[name.removesuffix(".__init__")] |= imported - {name.removesuffix(".__init__")}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        for target in sorted(graph.get(node, ())):
            if target in path:
                return path[path.index(target):] + [target]
            if target not in done:
                found = visit(target, path + [target])
                if found:
                    return found
        done.add(node)
        return None

    for start in sorted(graph):
        found = visit(start, [start])
        if found:
            return found
    return None


def test_no_import_cycle_between_modules():
    """No module imports, directly or through others, one that imports it back: inside a package too."""
    cycle = _find_cycle(_module_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}}) is None


def _declared_heads() -> dict[str, tuple[str, ...]]:
    """The module -> model-name heads (`<HEAD>_<backbone>`) it declares in a `*_HEADS` tuple of literals."""
    declared = {}
    for name, tree in _modules().items():
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id.endswith("_HEADS") and isinstance(node.value, ast.Tuple)):
                declared[name] = declared.get(name, ()) + tuple(element.value for element in node.value.elts)
    return declared


def _docstrings(tree: ast.Module) -> set[int]:
    nodes = [tree, *(node for node in ast.walk(tree)
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return {id(node.body[0].value) for node in nodes
            if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def test_model_name_prefixes_live_only_where_the_heads_are_declared():
    """A task's model-name prefixes ("sfpn", "maskrcnn_<backbone>", "upernet_*") appear as string literals only in
    the module that declares them; the others ask it (whole model names, e.g. a benchmark's default, are data, and
    so is the recipe table, which says which heads each recipe trains: a test checks those against the tasks)."""
    declared = _declared_heads()
    declared["biformer.recipes"] = ()
    heads = sorted(head for group in declared.values() for head in group)
    assert {"sfpn", "upernet", "retinanet", "fcos", "maskrcnn"} <= set(heads)
    prefix = re.compile(rf"\b({'|'.join(heads)})(_?$|_[<*/\s]|_?[ ,;)'\"])")
    found = []
    for name, tree in _modules().items():
        if name in declared:
            continue
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
                    and (node.value in heads or prefix.search(node.value))):
                found.append(f"{name}:{node.lineno}: {node.value!r}")
    assert found == []


OP_DEPENDENCIES = {"torch", "triton", "einops"}


def test_the_op_and_the_layers_need_torch_alone():
    """biformer.ops imports torch, triton and einops (and the standard library), and of biformer only its
    general layers; biformer.layers imports torch alone."""
    allowed = {"biformer.ops": {"biformer.ops", "biformer.layers"}, "biformer.layers": {"biformer.layers"}}
    offenders = []
    for name, tree in _modules().items():
        part = _part(name)
        if part not in allowed:
            continue
        outside = {imported for imported in _imports(name, tree) if _part(imported) not in allowed[part]}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                outside |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                outside.add(node.module.split(".")[0])
        third_party = OP_DEPENDENCIES if part == "biformer.ops" else {"torch"}
        outside = {module for module in outside if module.split(".")[0] not in third_party | {"__future__"}
                   and module not in sys.stdlib_module_names and not module.startswith("biformer")
                   or (module.startswith("biformer") and _part(module) not in allowed[part])}
        if outside:
            offenders.append(f"{name}: {sorted(outside)}")
    assert offenders == []


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


def test_a_training_run_looks_its_task_and_recipe_up_once(tmp_path, capsys):
    """Following `biformer train`'s options through the calls (a profiler that counts calls into a module from
    another): the recipe table and the task list are each entered once, by `biformer.recipes.resolve`."""
    import biformer.recipes
    import biformer.tasks.registry
    from biformer.cli import main

    watched = {biformer.recipes.__file__: "recipes", biformer.tasks.registry.__file__: "registry"}
    entries: list[tuple[str, str, str]] = []

    def profile(frame, event, arg):
        file = frame.f_code.co_filename
        if event == "call" and file in watched and (frame.f_back is None or frame.f_back.f_code.co_filename != file):
            entries.append((watched[file], frame.f_code.co_name, frame.f_back.f_code.co_name if frame.f_back else ""))

    sys.setprofile(profile)
    try:  # a dense model with a recipe of its own: the path that looks both up
        code = main(["train", "--model", "upernet_biformer_nano", "--data", "digit-scenes", "--img-size", "64",
                     "--iters", "1", "--dry-run", "--no-tensorboard", "--output", str(tmp_path / "run")])
    finally:
        sys.setprofile(None)
    assert code == 0, capsys.readouterr().err
    assert sorted(entries) == [("recipes", "resolve", "train"), ("registry", "task_for_training", "resolve")]
