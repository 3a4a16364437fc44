"""The backend registry (lnsr.ops.backends, issue #34): a backend is one file.

Every backend declares its name, loader, install hint and ``auto`` preference per device type in one
``register_backend`` call; lnsr.ops.dispatch derives ``BACKENDS``, ``AUTO_ORDER`` and
``INSTALL_HINT`` from the registry.  A toy backend (the torch reference behind the contract, written
to a temporary file and imported from its path, as a third party's would be) must appear everywhere a
built-in one does, at the place its preference gives it, pass the whole contract test, and leave no
trace once unregistered.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

import lnsr
from lnsr.config import LNSRConfig
from lnsr.ops import backends, dispatch
from lnsr.ops import reference as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CPU_EXT = "cpu" in dispatch.available_backends("cpu")

# The whole backend: PREF and BROKEN are filled in by ``write_toy``.
TOY = '''\
"""A backend in one file: the torch reference behind the Backend contract, on CPU tensors."""
import torch

from lnsr.ops.backend import Backend, TorchBackend
from lnsr.ops.backends import register_backend


class ToyBackend(Backend):
    name = "toy"

    def __init__(self):
        self.ref = TorchBackend()

    def supports(self, device):
        return torch.device(device).type == "cpu"

    def noise_kernel(self, numel, seed, device):
        return self.ref.noise_kernel(numel, seed, device)BROKEN

    def perturb_forward(self, h, seed, sigma, kind):
        return self.ref.perturb_forward(h, seed, sigma, kind)

    def perturb_forward_seeded(self, h, seed, sigma, kind):
        return self.ref.perturb_forward_seeded(h, seed, sigma, kind)

    def perturb_backward(self, grad):
        return self.ref.perturb_backward(grad)

    def penalty_forward(self, ys, mask, weights, detach_clean):
        return self.ref.penalty_forward(ys, mask, weights, detach_clean)

    def penalty_backward(self, grad, count, ys, mask, weights, detach_clean):
        return self.ref.penalty_backward(grad, count, ys, mask, weights, detach_clean)


register_backend("toy", ToyBackend, hint="pip install toy-kernels", auto={"cpu": PREF})
'''

BUILTIN_BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")
BUILTIN_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def write_toy(path, pref=50, broken=False):
    # broken: a noise stream off by 1e-3, which the contract's first noise test must catch
    path.write_text(TOY.replace("PREF", str(pref)).replace("BROKEN", " + 1e-3" if broken else ""))
    return path


def import_path(path):
    spec = importlib.util.spec_from_file_location(f"toy_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """``make(pref)``: writes the toy backend's file, imports it from its path (it registers itself)
    and returns the module; unregistered afterwards, and the tables checked to be the built-in ones."""
    for var in ("LNSR_BACKEND", "LNSR_AUTO", "LNSR_SELFCHECK"):
        monkeypatch.delenv(var, raising=False)

    def make(pref=50):
        return import_path(write_toy(tmp_path / "toy_backend.py", pref))

    yield make
    if backends.get("toy") is not None:
        backends.unregister_backend("toy")
    # nothing left behind: later tests see the built-in backends only
    assert tuple(dispatch.BACKENDS) == BUILTIN_BACKENDS and dispatch.AUTO_ORDER == BUILTIN_ORDER
    assert "toy" not in dispatch._LOADERS and "toy" not in dispatch._CACHE


def test_the_tables_are_derived_from_the_backend_files():
    assert dispatch.BACKENDS == BUILTIN_BACKENDS and dispatch.BACKENDS[1:] == BUILTIN_BACKENDS[1:]
    assert dispatch.AUTO_ORDER == BUILTIN_ORDER
    assert set(dispatch.INSTALL_HINT) == {"triton", "cuda", "cpu"}
    assert "pip install triton" in dispatch.INSTALL_HINT["triton"]
    # each declared in its own module of lnsr/ops/backends/
    where = {s.name: s.module for s in backends.specs()}
    assert where == {"torch": "lnsr.ops.backends.torch", "triton": "lnsr.ops.backends.triton",
                     "cuda": "lnsr.ops.backends.extension", "cpu": "lnsr.ops.backends.extension"}
    # the one object that code binds at import (lnsr.ops.BACKENDS, LNSRConfig's choices)
    assert lnsr.ops.BACKENDS is dispatch.BACKENDS


def test_a_backend_in_one_file_is_everywhere(toy, monkeypatch):
    mod = toy(pref=50)  # between cpu (100) and torch (0)
    assert dispatch.BACKENDS == (*BUILTIN_BACKENDS, "toy") and "toy" in lnsr.ops.BACKENDS
    assert dispatch.AUTO_ORDER == {**BUILTIN_ORDER, "cpu": ("cpu", "toy", "torch")}
    assert dispatch.INSTALL_HINT["toy"] == "pip install toy-kernels"
    assert "toy" in dispatch.available_backends("cpu") and "toy" not in dispatch.available_backends("meta")
    be = dispatch.resolve_backend("toy", "cpu")
    assert isinstance(be, mod.ToyBackend) and dispatch.load_backend("toy") is be
    # auto: the compiled cpu backend when built, else the toy (before torch)
    assert dispatch.resolve_backend("auto", "cpu").name == ("cpu" if HAS_CPU_EXT else "toy")
    monkeypatch.setenv("LNSR_BACKEND", "toy")
    assert dispatch.resolve_backend("auto", "cpu") is be
    monkeypatch.delenv("LNSR_BACKEND")
    # the public ops accept the new name (LNSRConfig: test_lnsr_config_accepts_a_registered_backend)
    h = torch.randn(2, 3, 8, requires_grad=True)
    torch.testing.assert_close(lnsr.ops.perturb(h, 3, sigma=0.1, backend="toy"), R.perturb(h, 3, sigma=0.1))
    with pytest.raises(RuntimeError, match="does not run on meta"):
        dispatch.resolve_backend("toy", "meta")
    # unregistered: gone from every table, and an unknown name again
    backends.unregister_backend("toy")
    assert tuple(dispatch.BACKENDS) == BUILTIN_BACKENDS and dispatch.AUTO_ORDER == BUILTIN_ORDER
    assert "toy" not in dispatch.INSTALL_HINT and "toy" not in dispatch.available_backends()
    with pytest.raises(ValueError, match="unknown backend 'toy'"):
        dispatch.resolve_backend("toy", "cpu")


# LNSRConfig's backend choices are ops.BACKENDS itself, a sequence that follows the registry: a backend
# registered after `import lnsr` is accepted by LNSRConfig (so lnsr.LNSR and --backend), and refused again
# once unregistered.
CONFIG_GAP = "backend must be one of"


def test_lnsr_config_accepts_a_registered_backend(toy):
    toy(pref=50)
    assert LNSRConfig(backend="toy").backend == "toy"
    backends.unregister_backend("toy")
    with pytest.raises(ValueError, match=CONFIG_GAP):
        LNSRConfig(backend="toy")


@pytest.mark.parametrize("pref, order", [
    (500, ("toy", "cpu", "torch")),   # above every built-in: auto takes it first
    (100, ("cpu", "toy", "torch")),   # a tie with cpu: registration order
    (-1, ("cpu", "torch", "toy")),    # below the reference: never reached (torch runs everywhere)
])
def test_auto_order_follows_the_preference(toy, pref, order):
    toy(pref=pref)
    assert dispatch.AUTO_ORDER["cpu"] == order and dispatch.AUTO_ORDER["cuda"] == BUILTIN_ORDER["cuda"]
    want = next(n for n in order if n == "toy" or n == "torch" or (n == "cpu" and HAS_CPU_EXT))
    assert dispatch.resolve_backend("auto", "cpu").name == want


def test_a_missing_backend_is_skipped_by_auto_and_named_when_asked_for(toy):
    def missing():
        raise ImportError("No module named 'toy_kernels'")

    backends.register_backend("toy", missing, hint="pip install toy-kernels", auto={"cpu": 500})
    assert dispatch.AUTO_ORDER["cpu"][0] == "toy"
    assert dispatch.resolve_backend("auto", "cpu").name == ("cpu" if HAS_CPU_EXT else "torch")
    assert "toy" not in dispatch.available_backends()
    with pytest.raises(RuntimeError, match=r"'toy' is not available \(ImportError: No module named 'toy_kernels'\); "
                                           r"pip install toy-kernels"):
        dispatch.resolve_backend("toy", "cpu")


def test_registration_is_checked_and_a_replacement_starts_anew(toy):
    mod = toy(pref=50)
    with pytest.raises(ValueError, match="already registered"):
        backends.register_backend("toy", mod.ToyBackend)
    for bad in ("auto", "Toy", "", "my-backend", 3):  # LNSR_BACKEND is read lowercased
        with pytest.raises(ValueError, match="lowercase identifier"):
            backends.register_backend(bad, mod.ToyBackend)
    with pytest.raises(TypeError, match="preference"):
        backends.register_backend("toy2", mod.ToyBackend, auto={"cpu": "high"})
    assert backends.get("toy2") is None
    first = dispatch.resolve_backend("toy", "cpu")
    other = mod.ToyBackend()
    backends.register_backend("toy", lambda: other, auto={"cpu": 500}, replace=True)
    assert dispatch.resolve_backend("toy", "cpu") is other is not first  # the loaded object is not kept
    assert dispatch.BACKENDS[-1] == "toy" and dispatch.AUTO_ORDER["cpu"][0] == "toy"
    assert "toy" not in dispatch.INSTALL_HINT  # the replacement declares no hint
    # register_loader (from before the registry) keeps the declaration, replaces the loader
    third = mod.ToyBackend()
    dispatch.register_loader("toy", lambda: third)
    assert dispatch.resolve_backend("toy", "cpu") is third and dispatch.AUTO_ORDER["cpu"][0] == "toy"


def _contract(path, xml, *args):
    """tests/test_backend_contract.py with LNSR_CONTRACT_BACKEND=path, in a child process; failures
    by test id (junit XML, with their messages)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LNSR_BACKEND", "LNSR_AUTO", "PYTEST_"))}
    env["LNSR_CONTRACT_BACKEND"] = str(path)
    res = subprocess.run([sys.executable, "-m", "pytest", "tests/test_backend_contract.py", "-q",
                          "-p", "no:cacheprovider", f"--junitxml={xml}", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    failures = {tc.get("name"): f.get("message") or "" for tc in ET.parse(xml).getroot().iter("testcase")
                for f in (*tc.findall("failure"), *tc.findall("error"))}
    return res, failures


@pytest.mark.slow
def test_the_contract_test_runs_on_a_backend_file(tmp_path):
    """LNSR_CONTRACT_BACKEND runs tests/test_backend_contract.py on the toy and only on it; a toy
    with a wrong noise stream fails it (so the run did test the toy)."""
    bad, failures = _contract(write_toy(tmp_path / "toy_bad.py", broken=True), tmp_path / "bad.xml", "-x")
    assert bad.returncode == 1 and list(failures) == ["test_noise_is_the_reference_stream[toy-cpu]"], \
        (bad.stdout + bad.stderr)[-3000:]
    good, failures = _contract(write_toy(tmp_path / "toy_good.py"), tmp_path / "good.xml")
    tail = (good.stdout + good.stderr)[-3000:]
    passed = int(re.search(r"(\d+) passed", good.stdout).group(1))
    assert passed >= 150, tail  # every contract test on toy-cpu (168 run on torch-cpu), not a handful
    assert not failures, {name: msg[:300] for name, msg in failures.items()}
    assert good.returncode == 0, tail
