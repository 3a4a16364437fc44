"""What is specific to the compiled backends (lnsr._C: csrc/); the op contract they share with
every backend is tested in test_backend_contract.py.

Here: the build, thread-count independence of the CPU reductions, the torch.library ops
(opcheck, their error messages), auto dispatch, the CUDA kernels' alignment and pointer-table
paths, and a broken build.  CPU tests run everywhere the extension is built; tests marked ``gpu``
need a CUDA device and the CUDA kernels.  Inputs are fresh random tensors on every run: the
generator seed is printed in each failure message so that a failure can be replayed with
LNSR_TEST_SEED.
"""
from __future__ import annotations

import importlib
import os
import random

import pytest
import torch

from lnsr.ops import reference as R

NO_EXT = os.environ.get("LNSR_NO_EXT", "0") == "1"
RUN_SEED = int(os.environ.get("LNSR_TEST_SEED", random.SystemRandom().randrange(2**31)))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Output tolerances: fp32 to float rounding of the noise (~1e-6 relative); half types to one
# rounding step of the stored value.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}
SEEDS = (0, 12345, 2**63 + 17, 2**64 - 1)  # both halves of the 64-bit key, the int64 sign boundary


def test_extension_is_built():
    """In CI the build ran: lnsr._C must import (LNSR_NO_EXT=1 is the only excuse)."""
    if NO_EXT:
        pytest.skip("LNSR_NO_EXT=1: the extension is deliberately not built")
    mod = importlib.import_module("lnsr._C")
    assert mod.WITH_CUDA in (0, 1)
    assert hasattr(torch.ops.lnsr, "perturb") and hasattr(torch.ops.lnsr, "layer_penalty")


def _cpu_backend():
    from lnsr.ops import extension

    try:
        return extension.backend("cpu")
    except ImportError as exc:
        pytest.skip(f"lnsr._C not available: {exc}")


@pytest.fixture(scope="module")
def cpu():
    return _cpu_backend()


@pytest.fixture
def gen():
    g = torch.Generator().manual_seed(RUN_SEED)
    return g


def _msg(what):
    return f"{what} (LNSR_TEST_SEED={RUN_SEED})"


def _randn(shape, dtype, gen, device="cpu", scale=1.0):
    return (scale * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)


def _mask(shape, gen, device="cpu", empty_rows=True):
    m = (torch.rand(shape, generator=gen) > 0.3).to(torch.int64)
    if empty_rows and shape[0] > 1:
        m[0] = 0  # a sequence with no valid token
    return m.to(device)


def _perturb_check(be, h, seed, kind, *, mask=None, device="cpu", n_anchors=R.DEFAULT_ANCHORS, sigma=0.1):
    """Forward and backward of be.perturb against the reference on the same input and grad."""
    gen = torch.Generator().manual_seed(RUN_SEED + 1)
    x = h.detach().clone().requires_grad_()
    xr = h.detach().clone().requires_grad_()
    out = be.perturb(x, seed, sigma=sigma, kind=kind, mask=mask, n_anchors=n_anchors)
    ref = R.perturb(xr, seed, sigma=sigma, kind=kind, mask=mask, n_anchors=n_anchors)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **TOL[h.dtype], msg=lambda m: _msg(f"perturb {kind} {h.dtype}: {m}"))
    g = _randn(out.shape, h.dtype, gen, device)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, **TOL[h.dtype], msg=lambda m: _msg(f"perturb grad: {m}"))


def _penalty_check(be, ys, *, mask=None, weights=None, detach_clean=False, loss_rtol=2e-5):
    xs = [y.detach().clone().requires_grad_() for y in ys]
    xr = [y.detach().clone().requires_grad_() for y in ys]
    loss = be.layer_penalty(xs, mask=mask, weights=weights, detach_clean=detach_clean)
    ref = R.layer_penalty(xr, mask=mask, weights=weights, detach_clean=detach_clean)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref, rtol=loss_rtol, atol=1e-6, msg=lambda m: _msg(f"layer_penalty: {m}"))
    grads = torch.autograd.grad(loss, xs)
    grads_ref = torch.autograd.grad(ref, xr)
    for j, (a, b) in enumerate(zip(grads, grads_ref)):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **TOL[a.dtype], msg=lambda m: _msg(f"layer_penalty grad {j}: {m}"))
    return loss


# ---------------------------------------------------------------------------------------------
# CPU kernels
# ---------------------------------------------------------------------------------------------

def test_cpu_results_bit_identical_across_thread_counts(cpu, gen):
    ys = [_randn((32, 32, 384), torch.float32, gen) for _ in range(3)]
    mask = _mask((16, 32), gen)
    runs = []
    for threads in (1, torch.get_num_threads()):  # the reduction order must not depend on threads either
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            xs = [y.clone().requires_grad_() for y in ys]
            loss = cpu.layer_penalty(xs, mask=mask, weights=[1.0, 0.3, 2.0])
            runs.append((loss.detach(), torch.autograd.grad(loss, xs)))
        finally:
            torch.set_num_threads(old)
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(p, q) for p, q in zip(runs[0][1], runs[1][1]))


def test_opcheck(cpu, gen):
    from torch.library import opcheck

    h = _randn((2, 3, 8), torch.float32, gen).requires_grad_()
    for kind in ("gaussian", "relative"):
        opcheck(torch.ops.lnsr.perturb.default, (h, 5, 0.1, kind))
    ys = [_randn((4, 3, 8), torch.float32, gen).requires_grad_(), _randn((4, 3, 5), torch.bfloat16, gen).requires_grad_()]
    opcheck(torch.ops.lnsr.layer_penalty.default, (ys, torch.ones(2, 3), torch.tensor([1.0, 2.0]), False))
    opcheck(torch.ops.lnsr.layer_penalty.default, (ys, None, torch.tensor([1.0, 0.5]), True))
    opcheck(torch.ops.lnsr.noise.default, (10, 5, torch.device("cpu")))
    y = _randn((5, 3, 8), torch.float32, gen)  # one row without a noisy copy, then 2 clean + 2 noisy
    opcheck(torch.ops.lnsr.penalty_tap_backward.default, (_randn((3, 3, 8), torch.float32, gen), torch.tensor(0.5), y,
                                                          1, torch.ones(2, 3), False))
    opcheck(torch.ops.lnsr.penalty_tap_backward.default, (None, torch.tensor(0.5), y, 1, None, True))


def test_auto_dispatch_prefers_the_cpu_kernels(cpu):
    from lnsr.ops import dispatch, perturb

    assert dispatch.AUTO_ORDER["cpu"][0] == "cpu"
    if os.environ.get("LNSR_BACKEND"):
        pytest.skip("LNSR_BACKEND overrides auto")
    assert dispatch.resolve_backend("auto", "cpu").name == "cpu"
    h = torch.randn(2, 3, 8)
    torch.testing.assert_close(perturb(h, 1, sigma=0.1, backend="cpu"), R.perturb(h, 1, sigma=0.1))


def test_kernel_errors_are_clear(cpu):
    with pytest.raises(RuntimeError, match="kind must be"):
        torch.ops.lnsr.perturb(torch.zeros(2, 3), 0, 0.1, "manifold")
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.lnsr.perturb(torch.zeros(2, 3, dtype=torch.float64), 0, 0.1, "gaussian")
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.lnsr.layer_penalty([torch.zeros(4, 3)], torch.ones(5), torch.ones(1), False)
    with pytest.raises(RuntimeError, match="weights"):
        torch.ops.lnsr.layer_penalty([torch.zeros(4, 3)], None, torch.ones(2), False)


# ---------------------------------------------------------------------------------------------
# CUDA kernels
# ---------------------------------------------------------------------------------------------

def _cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from lnsr.ops import extension

    try:
        return extension.backend("cuda")
    except ImportError as exc:
        if NO_EXT:
            pytest.skip(str(exc))
        raise  # a CUDA machine with the build must have the CUDA kernels


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_perturb_misaligned_input(gen, dtype):
    """A contiguous h whose data pointer is not 16-byte aligned takes the scalar path."""
    be = _cuda_backend()
    flat = _randn((1 + 4 * 6 * 64,), dtype, gen, device="cuda")
    h = flat[1:].view(4, 6, 64)
    assert h.data_ptr() % 16 != 0
    for kind in ("gaussian", "relative"):
        _perturb_check(be, h, 77, kind, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("n_layers", [1, 12, 40])  # 40 > the 32 layers of one launch's pointer table
def test_cuda_layer_penalty_layers(gen, n_layers):
    be = _cuda_backend()
    ys = [_randn((32, 128, (384, 768, 7)[j % 3]), DTYPES[j % 3], gen, device="cuda") for j in range(n_layers)]
    weights = [float(w) for w in torch.rand(n_layers, generator=gen)]
    mask = _mask((16, 128), gen, device="cuda")
    _penalty_check(be, ys, mask=mask, weights=weights, loss_rtol=1e-4)
    x = ys[0].clone().requires_grad_()
    loss = be.layer_penalty([x], mask=torch.zeros(16, 128, device="cuda"))
    assert loss.item() == 0.0


@pytest.mark.gpu
def test_cuda_opcheck(gen):
    _cuda_backend()
    from torch.library import opcheck

    h = _randn((2, 3, 8), torch.float32, gen, device="cuda").requires_grad_()
    opcheck(torch.ops.lnsr.perturb.default, (h, 5, 0.1, "relative"))
    ys = [_randn((4, 3, 8), torch.float16, gen, device="cuda").requires_grad_()]
    opcheck(torch.ops.lnsr.layer_penalty.default, (ys, torch.ones(2, 3, device="cuda"), torch.ones(1, device="cuda"),
                                                   False))
    y = _randn((4, 3, 8), torch.bfloat16, gen, device="cuda")
    opcheck(torch.ops.lnsr.penalty_tap_backward.default, (y[:2].clone(), torch.tensor(0.5, device="cuda"), y, 0,
                                                          torch.ones(2, 3, device="cuda"), False))


def test_broken_build_warns_once_and_falls_back(monkeypatch):
    """A built lnsr._C that fails to load (e.g. against another torch) warns once; auto uses torch."""
    import sys
    import warnings

    import lnsr
    from lnsr.ops import dispatch, extension

    monkeypatch.setattr(extension, "_C", None)
    monkeypatch.setattr(extension, "_LOAD_ERROR", None)
    monkeypatch.setattr(extension, "_is_built", lambda: True)
    monkeypatch.delattr(lnsr, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "lnsr._C", None)  # makes `from .. import _C` raise ImportError
    monkeypatch.setattr(dispatch, "_CACHE", {})
    monkeypatch.setattr(dispatch, "_ERRORS", {})
    monkeypatch.delenv("LNSR_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="failed to load"):
        assert dispatch.resolve_backend("auto", "cpu").name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert dispatch.resolve_backend("auto", "cpu").name == "torch"
        assert "failed to load" in dispatch._ERRORS["cpu"]
        with pytest.raises(RuntimeError, match="failed to load"):
            dispatch.resolve_backend("cuda", "cuda")


# ---------------------------------------------------------------------------------------------
# the compute-capability check of ``auto`` (faked: no GPU is needed)
# ---------------------------------------------------------------------------------------------

def test_arch_list_round_trip():
    """setup.py's arch_token (the build's -DLNSR_CUDA_ARCHS) read back by parse_archs, and the rule
    of which GPUs run which code."""
    import importlib.util as iu

    from lnsr.ops.extension import parse_archs, runs_on

    spec = iu.spec_from_file_location("lnsr_setup", os.path.join(os.path.dirname(__file__), "..", "setup.py"))
    setup_py = iu.module_from_spec(spec)
    spec.loader.exec_module(setup_py)
    assert setup_py.arch_token("8.0;9.0+PTX") == "0_8.0_9.0_PTX"
    archs = parse_archs(setup_py.arch_token("8.0;9.0+PTX"))
    assert archs == [(8, 0, "", False), (9, 0, "", True)]
    assert runs_on((8, 0), archs) and runs_on((8, 6), archs) and runs_on((8, 9), archs)  # sm_80 SASS
    assert runs_on((9, 0), archs) and runs_on((10, 0), archs) and runs_on((12, 0), archs)  # compute_90 PTX
    assert not runs_on((7, 5), archs) and not runs_on((7, 0), archs)  # nothing below 8.0
    assert not runs_on((9, 0), parse_archs(setup_py.arch_token("8.0 8.6")))
    assert runs_on((9, 0), parse_archs("0_9.0a")) and not runs_on((10, 0), parse_archs("0_9.0a"))
    assert parse_archs(None) is None and parse_archs("0_Ampere") is None  # unknown: not checked
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        setup_py.arch_token("8.0;sm-90")


@pytest.mark.skipif(NO_EXT, reason="LNSR_NO_EXT=1")
def test_built_extension_reports_its_cuda_archs():
    from lnsr.ops import extension

    mod = importlib.import_module("lnsr._C")
    if not mod.WITH_CUDA:
        pytest.skip("lnsr._C built without CUDA")
    archs = extension.compiled_archs()
    assert archs, f"lnsr._C.CUDA_ARCHS={getattr(mod, 'CUDA_ARCHS', None)!r} does not parse"


def test_auto_falls_back_to_triton_on_a_gpu_the_build_lacks(monkeypatch):
    """A GPU of compute capability 7.5 with a build for 8.0;9.0+PTX: ``auto`` takes Triton with one
    warning (however many calls), an explicit ``cuda`` raises naming TORCH_CUDA_ARCH_LIST; a
    capability the build covers keeps the extension."""
    pytest.importorskip("triton")
    import warnings

    from lnsr.ops import dispatch, extension

    be = _cpu_backend()  # the extension loads
    monkeypatch.setattr(extension, "with_cuda", lambda: True)
    monkeypatch.setattr(extension, "compiled_archs", lambda: extension.parse_archs("0_8.0_9.0_PTX"))
    monkeypatch.setattr(extension, "_CAPABILITY_OK", {})
    monkeypatch.setattr(extension._C, "CUDA_ARCHS", "0_8.0_9.0_PTX", raising=False)
    monkeypatch.setattr(dispatch, "_CACHE", {"cpu": be, "cuda": extension.ExtensionBackend("cuda")})
    monkeypatch.setattr(dispatch, "_ERRORS", {})
    monkeypatch.delenv("LNSR_BACKEND", raising=False)
    monkeypatch.setenv("LNSR_SELFCHECK", "0")  # no GPU to run the first-use check on: this is about the arch rule
    cap = [(7, 5)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        picked = [dispatch.resolve_backend("auto", "cuda").name for _ in range(3)]
    assert picked == ["triton"] * 3
    msgs = [str(w.message) for w in caught if "compute capability" in str(w.message)]
    assert len(msgs) == 1 and "7.5" in msgs[0] and "TORCH_CUDA_ARCH_LIST" in msgs[0], msgs
    with pytest.raises(RuntimeError, match=r"'cuda' cannot run on cuda.*compute capability 7\.5.*TORCH_CUDA_ARCH_LIST"):
        dispatch.resolve_backend("cuda", "cuda")
    cap[0] = (8, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve_backend("auto", "cuda").name == "cuda"



def _in_lnsr(module: str, filename: str) -> bool:
    """A frame of the installed lnsr package: by its module name, or by a file inside the package's
    own folder. Never by "lnsr" somewhere in the path: a checkout (and its venv) in a folder named
    lnsr would make every torch frame match."""
    import lnsr

    package = os.path.dirname(os.path.realpath(lnsr.__file__))
    return (module == "lnsr" or module.startswith("lnsr.")
            or os.path.realpath(filename).startswith(package + os.sep))


def _python_in_backward(module: str, filename: str) -> bool:
    """Python that a compiled op's backward must not run: lnsr's own code, torch.library's Python
    autograd glue, or a Python ``autograd.Function``."""
    return (_in_lnsr(module, filename) or module == "torch._library" or module.startswith("torch._library.")
            or module == "torch.autograd.function")


def test_frames_are_classified_by_package_not_by_the_checkout_folder_name():
    """The backward check below holds in a clone named lnsr: torch frames of a venv under
    /tmp/lnsr/.venv are not lnsr's; lnsr's own modules are, wherever they are installed."""
    import lnsr.ops.reference

    venv = "/tmp/lnsr/.venv/lib/python3.11/site-packages/torch"
    assert not _in_lnsr("torch.autograd.function", f"{venv}/autograd/function.py")
    assert not _in_lnsr("torch._tensor", f"{venv}/_tensor.py")
    assert not _python_in_backward("torch._tensor", f"{venv}/_tensor.py")
    assert not _python_in_backward("torch.autograd.graph", f"{venv}/autograd/graph.py")
    assert not _in_lnsr("lnsrx.tools", "/tmp/lnsr/lnsrx/tools.py")  # a prefix of the name is not the package
    assert _python_in_backward("torch.autograd.function", f"{venv}/autograd/function.py")
    assert _python_in_backward("torch._library.autograd", f"{venv}/_library/autograd.py")
    assert _in_lnsr("lnsr.ops.reference", R.__file__)
    assert _in_lnsr("__main__", lnsr.ops.reference.__file__)  # run as a script: found by its folder
    assert _in_lnsr("lnsr", lnsr.__file__)


def test_autograd_of_the_compiled_ops_is_cpp(cpu, gen):
    """perturb and layer_penalty differentiate in C++ (csrc/binding.cpp's Autograd kernels): their
    backward runs no Python function, and torch's dispatcher lists an Autograd kernel for both."""
    import sys

    for op in ("perturb", "layer_penalty"):
        line = [x for x in torch._C._dispatch_dump(f"lnsr::{op}").splitlines() if x.startswith("Autograd")]
        assert len(line) == 1 and "binding.cpp" in line[0], line
    ys = [torch.randn(4, 3, 8, generator=gen).requires_grad_() for _ in range(3)]
    h = torch.randn(2, 3, 8, generator=gen).requires_grad_()
    loss, _count = torch.ops.lnsr.layer_penalty(ys, torch.ones(2, 3), torch.ones(3), False)
    out = torch.ops.lnsr.perturb(h, 5, 0.1, "relative")
    total = loss + out.sum()
    calls = []
    sys.setprofile(lambda frame, event, arg: calls.append((frame.f_globals.get("__name__", ""),
                                                           frame.f_code.co_filename)) if event == "call" else None)
    try:
        total.backward()
    finally:
        sys.setprofile(None)
    python_in_backward = [f for m, f in calls if _python_in_backward(m, f)]
    assert python_in_backward == [], python_in_backward
    assert all(y.grad is not None for y in ys) and h.grad is not None


_HALF_PENALTY = """
import sys, torch, lnsr._C
g = torch.Generator().manual_seed(int(sys.argv[1]))
out = []
for dt in (torch.bfloat16, torch.float16):
    for H in (1, 7, 8, 9, 33, 384):
        ys = [torch.randn(6, 5, H, generator=g).to(dt) for _ in range(3)]
        mask = (torch.rand(3, 5, generator=g) > 0.3).float()
        out += list(torch.ops.lnsr.layer_penalty(ys, mask, torch.rand(3, generator=g), False))
print(repr([float(v).hex() for v in out]))
"""


def test_half_precision_penalty_avx2_path_is_the_scalar_path_bit_for_bit():
    """The AVX2 + F16C reduction of layer_penalty's forward for bf16/fp16 (picked at run time)
    returns the bits of the scalar loop it replaces (LNSR_CPU_NO_AVX2=1 forces that loop): hidden
    sizes below, at and off the 8-lane width."""
    import subprocess
    import sys
    pytest.importorskip("lnsr._C")
    runs = {}
    for off in (False, True):
        env = {k: v for k, v in os.environ.items() if k != "LNSR_CPU_NO_AVX2"}
        if off:
            env["LNSR_CPU_NO_AVX2"] = "1"
        res = subprocess.run([sys.executable, "-c", _HALF_PENALTY, str(RUN_SEED)], env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        runs[off] = res.stdout
    assert runs[False] == runs[True] and len(runs[False]) > 100
