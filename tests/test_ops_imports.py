"""biformer.ops stands alone: it imports torch, einops, triton (lazily) and the standard library only,
so that the op and its layer work without timm (the models' dependency)."""
import ast
import sys
from pathlib import Path

OPS = Path(__file__).resolve().parents[1] / "biformer" / "ops"
ALLOWED = {"torch", "einops", "triton", *sys.stdlib_module_names}


def test_ops_import_only_torch_einops_triton_and_the_standard_library():
    imported = {}
    for path in OPS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:  # relative imports stay inside
                names = [node.module]
            else:
                continue
            for name in names:
                imported.setdefault(name.split(".")[0], path.name)
    assert {"torch", "einops"} <= imported.keys()  # the walk saw the imports
    assert {name: where for name, where in imported.items() if name not in ALLOWED} == {}
