"""setup.py's install logic, without running pip: an isolated build (torch not importable) installs
the pure-Python package with a warning that says how to build lnsr._C; a failed compile warns and
never aborts; the Triton pin.  The build is monkeypatched, nothing is compiled or downloaded."""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.fixture
def setup_py(monkeypatch):
    monkeypatch.chdir(ROOT)  # setup.py names its sources relative to the working directory, as pip runs it
    spec = importlib.util.spec_from_file_location("lnsr_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: defines the functions, runs no setup()
    return mod


def test_importing_setup_py_runs_nothing(setup_py, monkeypatch):
    calls = []
    monkeypatch.setattr(setup_py, "setup", lambda **kw: calls.append(kw))
    assert calls == []
    setup_py.setup_package([], {})
    (kw,) = calls
    assert kw["extras_require"]["triton"] == ["triton>=3.4"]  # the noise stream needs it (lnsr.kernels.TRITON_MIN)
    assert kw["ext_modules"] == [] and kw["cmdclass"] == {}


def test_isolated_build_installs_the_python_package_with_a_build_hint(setup_py, monkeypatch):
    # pip's build isolation: torch is not a build requirement, so it does not import
    for name in ("torch", "torch.utils", "torch.utils.cpp_extension"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(setup_py, "_has_cxx", lambda: True)
    with pytest.warns(UserWarning) as record:
        ext_modules, cmdclass = setup_py.extension_modules()
    assert ext_modules == [] and cmdclass == {}
    (msg,) = [str(w.message) for w in record]
    assert "torch is not importable at build time" in msg
    assert "pure-Python package" in msg and "pip install --no-build-isolation ." in msg


def test_no_compiler_installs_the_python_package(setup_py, monkeypatch):
    monkeypatch.setattr(setup_py, "_has_cxx", lambda: False)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler.*--no-build-isolation"):
        assert setup_py.extension_modules() == ([], {})


def _build_ext_command(setup_py, monkeypatch, tmp_path):
    pytest.importorskip("torch")
    from setuptools import Distribution

    monkeypatch.setenv("LNSR_NO_CUDA", "1")
    ext_modules, cmdclass = setup_py.extension_modules()
    assert len(ext_modules) == 1 and "build_ext" in cmdclass
    dist = Distribution({"name": "lnsr", "ext_modules": ext_modules, "cmdclass": cmdclass})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "temp")
    cmd.ensure_finalized()
    return cmd


@pytest.mark.parametrize("error", ["compile", "exit"])
def test_failed_compile_warns_and_does_not_abort(setup_py, monkeypatch, tmp_path, error):
    import torch.utils.cpp_extension as cpp
    from setuptools.errors import CompileError

    cmd = _build_ext_command(setup_py, monkeypatch, tmp_path)

    def broken(self):
        if error == "exit":
            raise SystemExit("error: command 'g++' failed with exit code 1")
        raise CompileError("csrc/binding.cpp:1: error: expected ';'")

    monkeypatch.setattr(cpp.BuildExtension, "build_extensions", broken)
    with pytest.warns(UserWarning) as record:
        cmd.run()  # does not raise
    (msg,) = [str(w.message) for w in record if "lnsr" in str(w.message)]
    assert "compiling the extension lnsr._C failed" in msg and "pure-Python package" in msg
    assert ("expected ';'" if error == "compile" else "exit code 1") in msg
    assert "--no-build-isolation" in msg
    assert cmd.get_outputs() == [] and cmd.get_output_mapping() == {}


def test_successful_build_keeps_its_outputs(setup_py, monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp

    cmd = _build_ext_command(setup_py, monkeypatch, tmp_path)
    monkeypatch.setattr(cpp.BuildExtension, "build_extensions", lambda self: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        cmd.run()
    assert cmd.failed is None
    assert any("_C" in os.path.basename(p) for p in cmd.get_outputs())
