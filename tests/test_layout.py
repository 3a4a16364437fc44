"""The package's rooms (issue #34): a package's ``__init__.py`` holds imports and ``__all__`` only, the
code lives in modules named for what they hold, and setup.py ships every package."""
from __future__ import annotations

import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent
# the one tolerated piece of code: a lazy __getattr__ keeps the optional accelerate and TRL unimported
LAZY_GETATTR = {"lnsr/integrations/__init__.py"}


def _packages():
    return sorted(p.parent for p in (REPO / "lnsr").rglob("__init__.py") if "__pycache__" not in p.parts)


def test_package_init_files_hold_imports_and_all_only():
    for pkg in _packages():
        init = pkg / "__init__.py"
        rel = init.relative_to(REPO).as_posix()
        body = ast.parse(init.read_text(), rel).body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] in (
                    ["__all__"], ["__version__"]) and isinstance(node.value, (ast.List, ast.Tuple, ast.Constant)):
                continue
            if rel in LAZY_GETATTR and isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                continue
            raise AssertionError(f"{rel}:{node.lineno}: {type(node).__name__} in a package __init__: move the code "
                                 f"into a module named for what it holds and import it here")


def test_setup_py_ships_every_package():
    text = (REPO / "setup.py").read_text()
    listed = set(ast.literal_eval(re.search(r"packages=(\[[^\]]*\])", text).group(1)))
    found = {".".join(p.relative_to(REPO).parts) for p in _packages()} | {"lnsr.kernels"}
    assert listed == found, (sorted(found - listed), sorted(listed - found))


def test_no_entry_point_detours():
    """The tools import each other's rooms directly (lnsr.methods, lnsr.data); nothing is found
    through installed entry points, which a stale or missing install would break."""
    for path in (REPO / "lnsr").rglob("*.py"):
        assert "entry_points" not in path.read_text(), path
    assert '"lnsr.methods":' not in (REPO / "setup.py").read_text()
