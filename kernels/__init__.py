"""Triton kernels of the lnsr ops, installed as ``lnsr.kernels`` (``_backend``: the backend object,
``_triton``: the kernels and their ops; docs/design.md §4-5)."""
import os
import sys

if __name__ == "kernels":
    # Imported as a top-level module: Python found this source folder through the working directory
    # (the repository root on sys.path under `python -m`, `-c` or a REPL there).  The top-level name
    # belongs to the PyPI package `kernels`, which transformers >= 5.25 imports: hand over to it.
    import importlib.machinery
    import importlib.util

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        raise ImportError(
            f"'kernels' resolved to lnsr's source folder {os.path.dirname(os.path.abspath(__file__))}, which "
            "is not a top-level module: import it as lnsr.kernels (after `pip install -e .`); no other "
            "package named 'kernels' is installed")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement that got here returns what sys.modules holds
    _spec.loader.exec_module(_module)
else:
    from ._backend import TRITON_MIN, TritonBackend, _version_tuple, backend

    __all__ = ["backend", "TritonBackend", "TRITON_MIN"]
