import os
import sys

# `python -m pytest` (README's command) puts the working directory first on sys.path: keep the repository
# root off it, so that the tests import lnsr as installed and nothing from the source folders by accident
# (kernels/ hands the top-level name over to the PyPI package `kernels`: tests/test_kernels_name.py).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
os.environ["PYTHONSAFEPATH"] = "1"  # and off the path of the tests' `python -m` / `-c` child processes

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter; it must be set before any module that
# defines kernels is imported, hence here.  On a GPU machine the real compiler is used.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
