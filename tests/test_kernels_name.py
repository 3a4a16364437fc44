"""The source folder kernels/ is lnsr.kernels, never the top-level module `kernels`: that name belongs
to the PyPI package transformers >= 5.25 imports.  From the repository root (`python -m`, `-c`, a
REPL) the folder is on sys.path ahead of site-packages, so `import kernels` reaches it first; it must
hand over to the other package, or, with none installed, fail with an error that says what to do."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_from_root(code, *flags, extra_path=None):
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)  # conftest sets it for the other tests; here the root must be on the path
    env.pop("PYTHONPATH", None)
    if extra_path:
        env["PYTHONPATH"] = extra_path  # after the working directory ('' comes first under -c)
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_top_level_import_hands_over_to_the_other_package(tmp_path):
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("MARK = 'the other kernels'\n")
    res = _run_from_root("import sys, kernels; print(kernels.MARK); print(sys.modules['kernels'].__file__)",
                         extra_path=str(tmp_path))
    assert res.returncode == 0, res.stderr
    mark, path = res.stdout.split("\n")[:2]
    assert mark == "the other kernels"
    assert os.path.samefile(path, other / "__init__.py")


def test_top_level_import_without_another_package_names_the_fix():
    # -S: no site-packages, so no other `kernels` anywhere on the path
    res = _run_from_root("import kernels", "-S")
    assert res.returncode != 0
    assert "ImportError" in res.stderr and "import it as lnsr.kernels" in res.stderr, res.stderr


def test_the_installed_package_is_unaffected():
    res = _run_from_root("import lnsr.kernels as k, sys; print(k.__name__, k.TRITON_MIN, 'kernels' in sys.modules)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["lnsr.kernels", "(3,", "4)", "False"]


def test_transformers_model_classes_import_from_the_root():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package 'kernels' is not installed (transformers < 5.25 does not pull it in)")
    res = _run_from_root("import kernels, transformers; from transformers import AutoModelForSequenceClassification;"
                         "print(kernels.__file__)")
    assert res.returncode == 0, res.stderr[-2000:]
    assert not os.path.abspath(res.stdout.strip()).startswith(os.path.join(ROOT, "kernels"))
