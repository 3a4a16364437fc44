"""The backends' self-check (lnsr.ops.selfcheck, issue #35) and ``auto``'s use of it (lnsr.ops.dispatch).

On a CUDA device ``auto`` checks each compiled backend against the torch reference once per process
before using it, and passes over one that fails with one warning.  On this CPU-only machine the
check runs on the CPU: the real backends must pass it, broken stand-ins (the torch backend with a
wrong value, a wrong gradient, or a kernel that raises) must fail it, and with ``SELFCHECK_DEVICES``
patched to include "cpu" and a broken backend first in ``AUTO_ORDER["cpu"]``, ``auto`` must fall back.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import lnsr
from lnsr.ops import dispatch
from lnsr.ops import reference as R
from lnsr.ops import selfcheck as SC
from lnsr.ops.backend import TorchBackend

HAS_CPU_EXT = "cpu" in dispatch.available_backends("cpu")


class _ScaledPenalty(TorchBackend):
    """layer_penalty 1% too large (a kernel with a wrong value)."""

    name = "broken"

    def layer_penalty(self, ys, **kw):
        return super().layer_penalty(ys, **kw) * 1.01


class _WrongPerturbGrad(TorchBackend):
    """perturb with the right values and half the gradient (a wrong backward kernel)."""

    name = "broken"

    def perturb(self, h, seed, **kw):
        out = super().perturb(h, seed, **kw)
        return out.detach() + 0.5 * (out - out.detach())


class _Raises(TorchBackend):
    """perturb's kernel raises (a launch failure)."""

    name = "broken"

    def perturb_forward(self, h, seed, sigma, kind):
        raise RuntimeError("launch failed")


# ---------------------------------------------------------------------------------------------
# the check itself
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["torch", "cpu"])
def test_the_real_backends_pass(name):
    if name == "cpu" and not HAS_CPU_EXT:
        pytest.skip(f"lnsr._C is not built here ({dispatch._ERRORS.get('cpu')})")
    rng = torch.random.get_rng_state()
    res = SC.selfcheck(name, "cpu")
    assert res.ok, res.summary(limit=len(res.failures))
    assert torch.equal(torch.random.get_rng_state(), rng)  # the check leaves the global RNG alone
    ops = {op.split("[")[0].split(" ")[0] for op in res.checked}
    assert ops == {"noise", "perturb", "perturb_seeded", "layer_penalty", "penalty_stream"}
    assert all(f"perturb[{k}] grad" in res.checked for k in R.NOISE_KINDS)
    assert "layer_penalty[detach_clean=True] grad ys[1]" in res.checked
    if name == "cpu":  # lnsr._C's C++ tap and the Python tap (what torch.compile traces)
        assert "penalty_stream[detach_clean=False] grad ys[0]" in res.checked
        assert "penalty_stream[python tap][detach_clean=False] grad ys[0]" in res.checked


def test_the_check_runs_under_no_grad_and_inference_mode():
    # ``auto``'s first use may be in an evaluation loop: the check needs autograd whatever the context
    with torch.inference_mode():
        assert SC.selfcheck(_WrongPerturbGrad(), "cpu").failures  # gradients were computed and compared
        assert SC.selfcheck("torch", "cpu").ok


@pytest.mark.parametrize("broken, op, detail", [
    (_ScaledPenalty, "layer_penalty[detach_clean=False]", "max abs error"),
    (_WrongPerturbGrad, "perturb[relative] grad", "max abs error"),
    (_Raises, "perturb[gaussian]", "raised RuntimeError: launch failed"),
])
def test_a_broken_backend_fails(broken, op, detail):
    res = SC.selfcheck(broken(), "cpu")
    assert not res.ok
    by_op = {f.op: f.detail for f in res.failures}
    assert op in by_op and detail in by_op[op], res.summary(limit=len(res.failures))
    if broken is _WrongPerturbGrad:  # the values are right: only the gradients fail
        assert all(f.op.endswith(" grad") for f in res.failures)
        assert {f.op for f in res.failures} == {f"perturb[{k}] grad" for k in R.NOISE_KINDS}
    assert "'broken' on cpu" in res.summary()


def test_the_cli_reports_every_backend(capsys):
    assert SC.main(["cpu"]) == 0
    out = capsys.readouterr().out
    assert "ok    backend 'torch' on cpu" in out
    assert ("backend 'cpu' on cpu" in out) == HAS_CPU_EXT


# ---------------------------------------------------------------------------------------------
# ``auto`` with the check: the CPU stands in for CUDA
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def checked(monkeypatch):
    """SELFCHECK_DEVICES includes "cpu", AUTO_ORDER["cpu"] is (broken, cpu, torch), fresh caches;
    returns (install(backend), calls): calls counts the checks run per backend name."""
    monkeypatch.setattr(dispatch, "SELFCHECK_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(dispatch, "AUTO_ORDER", {**dispatch.AUTO_ORDER, "cpu": ("broken", "cpu", "torch")})
    monkeypatch.setattr(dispatch, "_LOADERS", dict(dispatch._LOADERS))
    for attr, fresh in (("_CACHE", {}), ("_ERRORS", {}), ("_SELFCHECKS", {}), ("_SELFCHECK_WARNED", set()),
                        ("_CHOICES", {}), ("_TIMINGS", {})):
        monkeypatch.setattr(dispatch, attr, fresh)
    for var in ("LNSR_BACKEND", "LNSR_SELFCHECK", "LNSR_AUTO"):
        monkeypatch.delenv(var, raising=False)
    calls: dict[str, int] = {}
    real = SC.selfcheck

    def counting(backend, device="cuda"):
        calls[backend.name] = calls.get(backend.name, 0) + 1
        return real(backend, device)

    monkeypatch.setattr(SC, "selfcheck", counting)

    def install(backend):
        dispatch._LOADERS["broken"] = lambda: backend
        return backend

    return install, calls


NEXT = "cpu" if HAS_CPU_EXT else "torch"


def _selfcheck_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "self-check" in str(w.message)]


@pytest.mark.parametrize("broken, what", [(_ScaledPenalty, "max abs error"), (_WrongPerturbGrad, "grad"),
                                          (_Raises, "RuntimeError: launch failed")])
def test_auto_falls_back_with_one_warning(checked, broken, what):
    install, calls = checked
    install(broken())
    ys = [torch.randn(4, 3, 8, requires_grad=True) for _ in range(2)]
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # "once" is lnsr's doing, not the warnings filter's
        assert dispatch.resolve_backend("auto", "cpu").name == NEXT
        assert dispatch.resolve_backend("auto", "cpu").name == NEXT
        loss = lnsr.ops.layer_penalty(ys, mask=mask)
        out = lnsr.ops.perturb(ys[0], 5, sigma=0.1, kind="relative")
    torch.testing.assert_close(loss, R.layer_penalty(ys, mask=mask).float())
    torch.testing.assert_close(out, R.perturb(ys[0], 5, sigma=0.1, kind="relative"))
    (w,) = _selfcheck_warnings(record)
    msg = str(w.message)
    assert "backend 'broken' failed its self-check" in msg and what in msg
    assert "LNSR_BACKEND=torch" in msg and "bench/gpu_check.sh" in msg and "next of cpu, torch" in msg
    assert calls == ({"broken": 1, "cpu": 1} if HAS_CPU_EXT else {"broken": 1})
    (res,) = [r for r in dispatch.selfcheck_results() if r["backend"] == "broken"]
    assert not res["ok"] and res["failures"]


def test_a_backend_that_passes_is_used_and_checked_once_per_device(checked, monkeypatch):
    install, calls = checked
    good = install(TorchBackend())
    good.name = "broken"  # a correct backend under the first name of the order
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for dev in ("cpu", torch.device("cpu"), "cpu:0"):  # one device, one check
            assert dispatch.resolve_backend("auto", dev) is good
        lnsr.ops.layer_penalty([torch.randn(4, 3, 8)], mask=torch.ones(2, 3))
        monkeypatch.setattr(dispatch, "MEASURED", {"cpu"})  # the measuring path checks its candidates too
        names = [c.name for c in dispatch.candidates(torch.device("cpu"))]
        assert names == ["broken"] + (["cpu"] if HAS_CPU_EXT else [])
    assert _selfcheck_warnings(record) == []
    assert calls == ({"broken": 1, "cpu": 1} if HAS_CPU_EXT else {"broken": 1})


def test_candidates_leave_out_a_failing_backend(checked):
    install, calls = checked
    install(_Raises())
    with pytest.warns(RuntimeWarning, match="'broken' failed its self-check"):
        names = [c.name for c in dispatch.candidates(torch.device("cpu"))]
    assert names == (["cpu"] if HAS_CPU_EXT else [])


def test_explicit_backends_and_lnsr_selfcheck_0_are_not_checked(checked, monkeypatch):
    install, calls = checked
    broken = install(_ScaledPenalty())
    monkeypatch.setattr(dispatch, "BACKENDS", (*dispatch.BACKENDS, "broken"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert dispatch.resolve_backend("broken", "cpu") is broken  # the caller's choice is kept
        monkeypatch.setenv("LNSR_BACKEND", "broken")
        assert dispatch.resolve_backend("auto", "cpu") is broken
        monkeypatch.delenv("LNSR_BACKEND")
        monkeypatch.setenv("LNSR_SELFCHECK", "0")
        assert dispatch.resolve_backend("auto", "cpu") is broken
    assert calls == {} and _selfcheck_warnings(record) == []


def test_the_check_runs_eagerly_while_torch_compile_traces(checked):
    """Traced code resolves ``auto`` at trace time: Dynamo runs the check eagerly (it is marked as a
    constant result) instead of tracing it, and the graph uses the next backend."""
    install, calls = checked
    install(_ScaledPenalty())
    torch._dynamo.reset()
    ys = [torch.randn(4, 3, 8, requires_grad=True) for _ in range(2)]
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])

    def step(a, b, mask):
        return lnsr.ops.layer_penalty([a * 2.0, b], mask=mask)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loss = torch.compile(step, backend="eager", fullgraph=True)(*ys, mask)
    torch._dynamo.reset()
    torch.testing.assert_close(loss, R.layer_penalty([ys[0] * 2.0, ys[1]], mask=mask).float())
    assert len(_selfcheck_warnings(record)) == 1
    assert calls == ({"broken": 1, "cpu": 1} if HAS_CPU_EXT else {"broken": 1})


def test_one_warning_per_backend_even_for_a_second_device(checked):
    # a second GPU is checked on its own, but the user hears about the backend once
    install, calls = checked
    install(_Raises())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dispatch.resolve_backend("auto", "cpu")
        dispatch._SELFCHECKS.clear()  # stands in for another device: a new (backend, device) key
        assert dispatch.resolve_backend("auto", "cpu").name == NEXT
    assert calls["broken"] == 2 and len(_selfcheck_warnings(record)) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_the_compiled_backends_pass_on_this_gpu(name):
    """What ``auto`` runs before using them (bench/gpu_check.sh runs ``pytest -m gpu``)."""
    if name not in dispatch.available_backends("cuda"):
        pytest.skip(f"backend {name!r} is not available here ({dispatch._ERRORS.get(name)})")
    res = SC.selfcheck(name, "cuda")
    assert res.ok, res.summary(limit=len(res.failures))


def test_a_registered_replacement_is_checked_anew(checked):
    install, calls = checked
    install(_Raises())
    with pytest.warns(RuntimeWarning, match="'broken' failed its self-check"):
        assert dispatch.resolve_backend("auto", "cpu").name == NEXT
    fixed = TorchBackend()
    fixed.name = "broken"
    dispatch.register_loader("broken", lambda: fixed)
    assert dispatch.resolve_backend("auto", "cpu") is fixed and calls["broken"] == 2
