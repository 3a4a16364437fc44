"""The backend contract (lnsr.ops.backend), run over every backend available on this machine.

Each backend against the torch reference, the single definition, on fresh random inputs: the
noise stream; perturb of every kind (values and gradients); layer_penalty (values, gradients,
masks with empty rows, weights, detach_clean); awkward shapes (odd hidden sizes, batch of 1,
non-contiguous); dtypes; the shared fallback rule (float64, empty tensors); the kernel-level
forward/backward pairs; the one schema of the compiled ops; torch.compile; LNSR end to end.

Backends are every ``(name, device)`` that ``lnsr.ops.available_backends`` reports for the CPU
and, when present, the GPU: torch, cpu (lnsr._C) and triton (under TRITON_INTERPRET=1, see
conftest.py, hence the small tensors) on a CPU-only machine.  What is specific to one backend
(alignment, interpreter limits, opcheck, thread counts) stays in test_triton.py /
test_extension.py.  Failure messages print the generator seed: replay with LNSR_TEST_SEED.

``LNSR_CONTRACT_BACKEND=path/to/module.py`` (or a module name) runs the contract on the backends
that module registers (``lnsr.ops.backends.register_backend``) and only on them: how a new backend
file is tested before anything else (tests/test_backend_registry.py does it with a toy backend).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import random

import pytest
import torch

import lnsr
from lnsr.ops import backend as B
from lnsr.ops import dispatch
from lnsr.ops import reference as R
from torch.utils._python_dispatch import TorchDispatchMode

RUN_SEED = int(os.environ.get("LNSR_TEST_SEED", random.SystemRandom().randrange(2**31)))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Outputs: fp32 to float rounding of the noise; half types to a rounding step of the stored value.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
SEEDS = (0, 12345, 2**32, 2**63 + 17, 2**64 - 1)  # both key words, the int64 sign boundary, the top


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _selected_backends():
    """The names LNSR_CONTRACT_BACKEND's module registers when it is imported, or None (every backend)."""
    target = os.environ.get("LNSR_CONTRACT_BACKEND", "").strip()
    if not target:
        return None
    before = {s.name for s in lnsr.ops.backends.specs()}
    if target.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"lnsr_contract_{os.path.basename(target)[:-3]}", target)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    else:
        importlib.import_module(target)
    names = [s.name for s in lnsr.ops.backends.specs() if s.name not in before]
    assert names, f"LNSR_CONTRACT_BACKEND={target} registered no backend (lnsr.ops.backends.register_backend)"
    return names


SELECTED = _selected_backends()
PAIRS = [(name, dev) for dev in _devices() for name in dispatch.available_backends(dev)
         if SELECTED is None or name in SELECTED]


@pytest.fixture(params=PAIRS, ids=[f"{n}-{d}" for n, d in PAIRS])
def bd(request):
    """(backend object, device) for every backend on this machine."""
    name, dev = request.param
    return dispatch.resolve_backend(name, dev), dev


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(RUN_SEED)


def _msg(what):
    return lambda m: f"{what} (LNSR_TEST_SEED={RUN_SEED}): {m}"


def _randn(shape, dtype, gen, device, scale=1.0):
    return (scale * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)


def _mask(shape, gen, device, empty_row=True):
    m = (torch.rand(shape, generator=gen) > 0.3).to(torch.int64)
    if empty_row and shape[0] > 1:
        m[0] = 0  # a sequence that is all padding
    return m.to(device)


def _seed():
    return random.Random(RUN_SEED).choice(SEEDS)


# ---------------------------------------------------------------------------------------------
# the machine and the contract itself
# ---------------------------------------------------------------------------------------------

def test_every_backend_on_this_machine_is_covered():
    names = {n for n, _ in PAIRS}
    if SELECTED is not None:  # the selected backends load and run here: else every test below would be skipped
        assert names == set(SELECTED), {n: dispatch._ERRORS.get(n) for n in set(SELECTED) - names}
        return
    assert "torch" in names
    if os.environ.get("LNSR_NO_EXT", "0") != "1" and importlib.util.find_spec("lnsr._C") is not None:
        assert "cpu" in names, dispatch._ERRORS.get("cpu")
    if importlib.util.find_spec("triton") is not None and (torch.cuda.is_available()
                                                           or os.environ.get("TRITON_INTERPRET") == "1"):
        assert "triton" in names, dispatch._ERRORS.get("triton")


def test_backends_implement_the_contract(bd):
    be, dev = bd
    assert isinstance(be, B.Backend) and be.supports(torch.device(dev))
    assert not be.supports(torch.device("meta")) or be.name == "torch"


@pytest.mark.parametrize("op", sorted(B.OP_SCHEMAS))
def test_compiled_ops_share_one_schema(op):
    namespaces = {be.namespace for be in (dispatch.resolve_backend(n, d) for n, d in PAIRS)
                  if isinstance(be, B.OpsBackend)}
    for ns in namespaces:
        schema = getattr(getattr(torch.ops, ns), op).default._schema
        assert str(schema) == f"{ns}::{op}{B.OP_SCHEMAS[op]}"


def test_seed_bits_and_weights():
    assert B.seed_bits(0) == 0 and B.seed_bits(2**63 - 1) == 2**63 - 1
    assert B.seed_bits(2**63) == -(2**63) and B.seed_bits(2**64 - 1) == -1
    assert all(B.unsigned_seed(B.seed_bits(s)) == s for s in SEEDS)
    with pytest.raises(ValueError, match="seed"):
        B.seed_bits(2**64)
    w = B.weights_tensor([1, 0.5], 2, "cpu")
    assert w.dtype == torch.float32 and w.tolist() == [1.0, 0.5]
    assert torch.equal(B.weights_tensor(None, 3, "cpu"), torch.ones(3))
    assert torch.equal(B.weights_tensor(torch.tensor([[2.0], [3.0]], dtype=torch.float64), 2, "cpu"),
                       torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="2 entries for 3"):
        B.weights_tensor([1.0, 2.0], 3, "cpu")


# ---------------------------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------------------------

def test_noise_is_the_reference_stream(bd):
    be, dev = bd
    fresh = random.SystemRandom().randrange(2**64)
    for seed in (*SEEDS, fresh):
        for numel in (1, 3, 4, 7, 4099):
            z = be.noise(numel, seed, device=dev)
            assert z.dtype == torch.float32 and z.shape == (numel,) and z.device.type == dev
            torch.testing.assert_close(z, R.noise(numel, seed, device=dev), rtol=1e-5, atol=1e-6,
                                       msg=_msg(f"noise seed {seed} numel {numel}"))
    assert be.noise(0, 1, device=dev).numel() == 0
    assert be.noise(5, 1, device=dev, dtype=torch.float16).dtype == torch.float16
    with pytest.raises((TypeError, ValueError), match="seed"):
        be.noise(4, -1, device=dev)
    with pytest.raises(ValueError, match="numel"):
        be.noise(-1, 1, device=dev)


# ---------------------------------------------------------------------------------------------
# perturb
# ---------------------------------------------------------------------------------------------

def _perturb_check(be, h, seed, kind, *, mask=None, n_anchors=4, sigma=0.1, gen=None):
    """Forward and backward of be.perturb against the reference on the same input and grad."""
    x = h.detach().clone().requires_grad_()
    xr = h.detach().clone().requires_grad_()
    out = be.perturb(x, seed, sigma=sigma, kind=kind, mask=mask, n_anchors=n_anchors)
    ref = R.perturb(xr, seed, sigma=sigma, kind=kind, mask=mask, n_anchors=n_anchors)
    assert out.shape == ref.shape and out.dtype == h.dtype and out.device == h.device
    b = h.shape[0]
    assert torch.equal(out[:b], h), "the clean half is an exact copy"
    torch.testing.assert_close(out, ref, **TOL[h.dtype], msg=_msg(f"perturb {kind} {h.dtype} {tuple(h.shape)}"))
    g = _randn(out.shape, h.dtype, gen or torch.Generator().manual_seed(RUN_SEED + 1), h.device)
    (gx,) = torch.autograd.grad(out, x, g)
    (gr,) = torch.autograd.grad(ref, xr, g)
    torch.testing.assert_close(gx, gr, **TOL[h.dtype], msg=_msg(f"perturb grad {kind} {h.dtype}"))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", R.NOISE_KINDS)
# odd hidden sizes, batch 1, 2-d h; 384, 1024 and 4096 rows start on 16-byte boundaries (vector
# paths; 1024 and 4096 take CUDA's one-read block-per-row relative kernel)
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 5, 1), (2, 3, 7), (3, 4, 33), (1, 2, 769), (2, 769), (2, 3, 384),
                                   (3, 1024), (2, 4096)])
def test_perturb_matches_reference(bd, gen, dtype, kind, shape):
    be, dev = bd
    h = _randn(shape, dtype, gen, dev, scale=3.0)
    mask = _mask(shape[:-1], gen, dev)  # only manifold reads it: anchors among valid tokens
    _perturb_check(be, h, _seed(), kind, mask=mask, gen=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", R.NOISE_KINDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 7), (3, 4, 33), (2, 3, 384), (0, 3, 8)])
def test_device_seed_gives_the_int_seeds_values(bd, gen, dtype, kind, shape):
    """perturb_seeded with a device seed (the seed's bits in an int64 on h's device, read by the
    kernel) equals perturb with the int seed, bit for bit, for every seed and both key words."""
    be, dev = bd
    h = _randn(shape, dtype, gen, dev, scale=3.0)
    mask = _mask(shape[:-1], gen, dev) if shape[0] else None
    for seed in SEEDS:
        seed_t = torch.tensor(B.seed_bits(seed), dtype=torch.int64, device=dev)
        x = h.clone().requires_grad_()
        out = be.perturb_seeded(x, seed_t, sigma=0.1, kind=kind, mask=mask, n_anchors=4)
        x2 = h.clone().requires_grad_()
        ref = be.perturb(x2, seed, sigma=0.1, kind=kind, mask=mask, n_anchors=4)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, msg=_msg(f"seed {seed} {kind} {dtype} {shape}"))
        if h.numel():
            g = torch.ones_like(out)
            torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x2, g)[0],
                                       rtol=0, atol=0)
    # the reference's Philox with a tensor key is the int-keyed stream
    for seed in SEEDS:
        bits = torch.tensor(B.seed_bits(seed), dtype=torch.int64, device=dev)
        assert torch.equal(R.noise(9, bits, device=dev), R.noise(9, seed, device=dev))


def test_device_seed_is_checked(bd, gen):
    be, dev = bd
    if not isinstance(be, B.OpsBackend):
        pytest.skip(f"the {be.name} backend has no torch.library op")
    h = _randn((2, 3, 8), torch.float32, gen, dev)
    for bad in (torch.zeros(2, dtype=torch.int64, device=dev), torch.zeros((), dtype=torch.int32, device=dev)):
        with pytest.raises((RuntimeError, ValueError), match="seed must be a one-element int64 tensor"):
            be.ops.perturb_seeded(h, bad, 0.1, "relative")


def test_perturb_noise_is_the_stream(bd):
    """gaussian, sigma 1, h = 0: the noisy half is exactly the noise stream."""
    be, dev = bd
    h = torch.zeros(3, 5, 7, device=dev)
    out = be.perturb(h, 99, sigma=1.0, kind="gaussian")
    torch.testing.assert_close(out[3:].reshape(-1), R.noise(h.numel(), 99, device=dev), rtol=1e-5, atol=1e-6)


def test_perturb_sigma_zero_and_no_valid_token_are_exact_copies(bd, gen):
    be, dev = bd
    h = _randn((2, 3, 8), torch.float32, gen, dev)
    for kind in R.NOISE_KINDS:
        assert torch.equal(be.perturb(h, 5, sigma=0.0, kind=kind)[2:], h), kind
    empty = torch.zeros(2, 3, dtype=torch.long, device=dev)
    assert torch.equal(be.perturb(h, 5, sigma=0.5, kind="manifold", mask=empty, n_anchors=4)[2:], h)


def test_perturb_non_contiguous(bd, gen):
    be, dev = bd
    h = _randn((4, 6, 10), torch.float32, gen, dev)[:, :, 1:8]
    assert not h.is_contiguous()
    for kind in R.NOISE_KINDS:
        _perturb_check(be, h, 5, kind, gen=gen)


@pytest.mark.parametrize("kind", B.DENSE_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_forward_backward_pair(bd, gen, kind, dtype):
    """The kernel-level pair: perturb_forward is differentiable and its gradient is perturb_backward."""
    be, dev = bd
    h = _randn((3, 2, 9), dtype, gen, dev).requires_grad_()
    out = be.perturb_forward(h, B.seed_bits(2**63 + 3), 0.2, kind)
    g = _randn(out.shape, dtype, gen, dev)
    (gh,) = torch.autograd.grad(out, h, g)
    torch.testing.assert_close(gh, be.perturb_backward(g), rtol=0, atol=0)
    # (to a rounding step: Triton's interpreter does not round bf16 to nearest like the GPU does)
    torch.testing.assert_close(gh, (g[:3].float() + g[3:].float()).to(dtype), **TOL[dtype])


# ---------------------------------------------------------------------------------------------
# layer_penalty
# ---------------------------------------------------------------------------------------------

def _penalty_check(be, ys, *, mask=None, weights=None, detach_clean=False, loss_rtol=2e-5):
    xs = [y.detach().clone().requires_grad_() for y in ys]
    xr = [y.detach().clone().requires_grad_() for y in ys]
    loss = be.layer_penalty(xs, mask=mask, weights=weights, detach_clean=detach_clean)
    ref = R.layer_penalty(xr, mask=mask, weights=weights, detach_clean=detach_clean)
    assert loss.dtype == torch.float32 and loss.shape == () and loss.device == ys[0].device
    torch.testing.assert_close(loss, ref.float(), rtol=loss_rtol, atol=1e-6, msg=_msg("layer_penalty"))
    grads = torch.autograd.grad(loss * 3.0, xs)
    grads_ref = torch.autograd.grad(ref * 3.0, xr)
    b = ys[0].shape[0] // 2
    for j, (a, r) in enumerate(zip(grads, grads_ref)):
        assert a.dtype == r.dtype and a.shape == r.shape
        torch.testing.assert_close(a, r, **TOL[a.dtype], msg=_msg(f"layer_penalty grad {j}"))
        if detach_clean:
            assert torch.count_nonzero(a[:b]) == 0
    return loss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 7, 33, 769])
@pytest.mark.parametrize("batch", [1, 3])
def test_layer_penalty_matches_reference(bd, gen, dtype, hidden, batch):
    be, dev = bd
    ys = [_randn((2 * batch, 5, hidden), dtype, gen, dev) for _ in range(2)]
    mask = _mask((batch, 5), gen, dev)
    for detach_clean in (False, True):
        _penalty_check(be, ys, mask=mask, weights=[0.5, 2.0], detach_clean=detach_clean)
        _penalty_check(be, ys, mask=None, detach_clean=detach_clean)


@pytest.mark.parametrize("n_layers", [1, 12])
def test_layer_penalty_mixed_layers_masks_and_weights(bd, gen, n_layers):
    """Layers of different hidden sizes and dtypes in one call; bool, int, fractional masks."""
    be, dev = bd
    hiddens = [7, 384, 33, 16, 5000]  # 5000: more than one tile of a row
    ys = [_randn((4, 5, hiddens[j % 5]), DTYPES[j % 3], gen, dev) for j in range(n_layers)]
    weights = [float(w) for w in torch.rand(n_layers, generator=gen) * 2]
    masks = (None, _mask((2, 5), gen, dev), torch.ones(2, 5, dtype=torch.bool, device=dev),
             torch.rand((2, 5), generator=gen).to(dev))
    for mask in masks:
        _penalty_check(be, ys, mask=mask, weights=weights)
    _penalty_check(be, ys, mask=masks[1], weights=torch.tensor(weights, device=dev), detach_clean=True)
    _penalty_check(be, ys, mask=masks[3], weights=None, detach_clean=True)


def test_layer_penalty_empty_mask_is_zero_with_zero_gradients(bd, gen):
    be, dev = bd
    ys = [_randn((4, 6, 33), torch.float32, gen, dev).requires_grad_() for _ in range(2)]
    loss = be.layer_penalty(ys, mask=torch.zeros(2, 6, device=dev))
    assert loss.item() == 0.0  # N = max(N, 1): 0, not NaN
    assert all(torch.count_nonzero(g) == 0 for g in torch.autograd.grad(loss, ys))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_tokens_may_hold_anything(bd, gen, dtype):
    """Padding may hold NaN/inf: masked tokens add nothing and get an exactly zero gradient."""
    be, dev = bd
    ys = [_randn((4, 5, h), dtype, gen, dev) for h in (7, 16)]
    mask = _mask((2, 5), gen, dev)
    pad = (mask == 0).repeat(2, 1)  # the masked tokens' rows in both halves
    bad = []
    for y in ys:
        y = y.clone()
        y[pad] = float("nan")  # the clean copies NaN ...
        y[2:][mask == 0] = float("inf")  # ... the noisy copies inf
        bad.append(y.requires_grad_())
    loss = be.layer_penalty(bad, mask=mask, weights=[1.0, 0.5])
    xr = [y.clone().requires_grad_() for y in ys]
    ref = R.layer_penalty(xr, mask=mask, weights=[1.0, 0.5])
    torch.testing.assert_close(loss, ref.float(), rtol=2e-5, atol=1e-6)
    for g, gr in zip(torch.autograd.grad(loss, bad), torch.autograd.grad(ref, xr)):
        assert torch.equal(g[pad], torch.zeros_like(g[pad])) and torch.isfinite(g).all()
        torch.testing.assert_close(g, gr, **TOL[dtype])


def test_layer_penalty_hand_computed(bd):
    # B = 1, T = 2, H = 2.  clean rows (0,0),(1,1); noisy rows (3,4),(1,2): ||d||^2 = 25 and 1.
    be, dev = bd
    y = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[3.0, 4.0], [1.0, 2.0]]], device=dev)
    assert be.layer_penalty([y]).item() == pytest.approx(13.0)  # (25 + 1) / 2
    assert be.layer_penalty([y], mask=torch.tensor([[1, 0]], device=dev)).item() == pytest.approx(25.0)  # N = 1
    assert be.layer_penalty([y, y], weights=[1.0, 0.5]).item() == pytest.approx(19.5)
    assert be.layer_penalty([y], mask=torch.zeros(1, 2, device=dev)).item() == 0.0  # empty mask: 0, not NaN


@pytest.mark.parametrize("masked", [False, True])
def test_penalty_forward_backward_pair(bd, gen, masked):
    """The kernel-level pair: (loss, count) and the gradients penalty_backward gives."""
    be, dev = bd
    ys = [_randn((6, 4, h), dt, gen, dev).requires_grad_() for h, dt in ((9, torch.float32), (16, torch.bfloat16))]
    mask = _mask((3, 4), gen, dev) if masked else None
    w = B.weights_tensor([0.7, 1.3], 2, dev)
    loss, count = be.penalty_forward(ys, mask, w, False)
    assert count.dtype == torch.float32 and count.shape == () and not count.requires_grad
    assert count.item() == (mask.sum().item() if masked else 12)
    g = torch.tensor(1.7, device=dev)
    auto = torch.autograd.grad(loss, ys, g)
    manual = be.penalty_backward(g, count, ys, mask, w, False)
    for a, m in zip(auto, manual):
        torch.testing.assert_close(a, m, rtol=0, atol=0)
    for a, m in zip(be.penalty_backward(g, count, ys, mask, w, True), manual):
        assert torch.count_nonzero(a[:3]) == 0 and torch.equal(a[3:], m[3:])


def test_layer_penalty_rejects_a_wrong_number_of_weights(bd, gen):
    be, dev = bd
    for dtype in (torch.float32, torch.float64):  # the kernels' path and the fallback alike
        y = _randn((4, 3, 5), dtype, gen, dev)
        with pytest.raises(ValueError, match="weights"):
            be.layer_penalty([y, y], weights=[1.0])
        with pytest.raises(ValueError, match="weights"):
            be.layer_penalty([y], weights=torch.ones(2))


# ---------------------------------------------------------------------------------------------
# the shared fallback rule, determinism, compile
# ---------------------------------------------------------------------------------------------

def test_float64_and_empty_tensors_take_the_reference(bd, gen):
    be, dev = bd
    h = _randn((2, 3, 5), torch.float64, gen, dev)
    for kind in R.NOISE_KINDS:
        assert torch.equal(be.perturb(h, 3, sigma=0.1, kind=kind), R.perturb(h, 3, sigma=0.1, kind=kind))
    ys = [_randn((4, 3, 5), torch.float64, gen, dev), _randn((4, 3, 2), torch.float32, gen, dev)]
    mask = _mask((2, 3), gen, dev)
    assert torch.equal(be.layer_penalty(ys, mask=mask), R.layer_penalty(ys, mask=mask))
    for shape in ((0, 3, 4), (2, 3, 0), (2, 0, 4)):
        e = torch.zeros(shape, device=dev)
        for kind in R.NOISE_KINDS:
            out = be.perturb(e, 3, sigma=0.1, kind=kind)
            assert out.shape == (2 * shape[0], *shape[1:])
    for shape in ((0, 3, 4), (4, 3, 0), (4, 0, 5)):  # an empty batch gives 0 like an empty mask
        loss = be.layer_penalty([torch.zeros(shape, device=dev)])
        assert loss.item() == 0.0 and loss.dtype == torch.float32


def test_bit_identical_across_runs(bd, gen):
    be, dev = bd
    h = _randn((4, 8, 96), torch.float32, gen, dev)
    for kind in R.NOISE_KINDS:
        assert torch.equal(be.perturb(h, 7, sigma=0.05, kind=kind), be.perturb(h, 7, sigma=0.05, kind=kind))
    ys = [_randn((8, 8, 96), torch.float32, gen, dev) for _ in range(3)]
    mask = _mask((4, 8), gen, dev)
    runs = []
    for _ in range(2):
        xs = [y.clone().requires_grad_() for y in ys]
        loss = be.layer_penalty(xs, mask=mask, weights=[1.0, 0.3, 2.0])
        runs.append((loss.detach(), torch.autograd.grad(loss, xs)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(p, q) for p, q in zip(runs[0][1], runs[1][1]))


def test_torch_compile_fullgraph(bd, gen):
    be, dev = bd
    if be.name == "torch":
        pytest.skip("the reference is plain torch code; compiling its Philox is slow and tests torch, not lnsr")

    def step(h, mask):
        x = be.perturb(h, 11, sigma=0.05, kind="relative")
        return be.layer_penalty([x * 2.0, x.tanh()], mask=mask, weights=[1.0, 0.5])

    h = _randn((2, 4, 16), torch.float32, gen, dev).requires_grad_()
    mask = _mask((2, 4), gen, dev, empty_row=False)
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(h, mask)
    (g,) = torch.autograd.grad(out, h)
    h2 = h.detach().clone().requires_grad_()
    ref = step(h2, mask)
    (g2,) = torch.autograd.grad(ref, h2)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g2)


@pytest.mark.parametrize("where", ["host", "device"])
@pytest.mark.parametrize("kind", ["relative", "manifold"])
def test_torch_compile_tensor_seed_is_a_graph_input(bd, gen, kind, where):
    """A tensor seed traced by torch.compile is one opaque op: a new seed value compiles no new
    graph, and the values and gradients are those of the int seed.  ``host``: a uint64 CPU tensor
    read on the host; ``device``: the seed's bits in an int64 on h's device, read by the kernel
    (what LNSR passes, so that a captured CUDA graph draws new noise on each replay)."""
    be, dev = bd
    compiled = []

    def counting_backend(gm, example_inputs):
        compiled.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def step(h, seed, mask):
        return lnsr.ops.perturb(h, seed, sigma=0.05, kind=kind, mask=mask, n_anchors=4, backend=be.name)

    torch._dynamo.reset()
    fn = torch.compile(step, backend=counting_backend, fullgraph=True)
    h = _randn((2, 4, 16), torch.float32, gen, dev)
    mask = _mask((2, 4), gen, dev, empty_row=False)
    seed_t = torch.zeros((), dtype=torch.uint64) if where == "host" else torch.zeros((), dtype=torch.int64, device=dev)
    for seed in SEEDS[1:]:
        seed_t.fill_(seed if where == "host" else B.seed_bits(seed))
        x = h.clone().requires_grad_()
        out = fn(x, seed_t, mask)
        (g,) = torch.autograd.grad((out * out).sum(), x)
        x2 = h.clone().requires_grad_()
        ref = be.perturb(x2, seed, sigma=0.05, kind=kind, mask=mask, n_anchors=4)
        (g2,) = torch.autograd.grad((ref * ref).sum(), x2)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, msg=f"seed {seed}")
        torch.testing.assert_close(g, g2, msg=f"seed {seed}")
    assert len(compiled) == 1
    # what the traced path checks (by metadata; an exception inside a fullgraph trace is rewrapped)
    for bad, err in ((torch.zeros(2, dtype=torch.int64), TypeError), (torch.zeros((), dtype=torch.float32), TypeError),
                     (torch.zeros((), dtype=torch.int64, device="meta"), ValueError)):
        with pytest.raises(err, match="seed"):
            lnsr.ops.functional._check_seed_tensor(bad, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# LNSR end to end: the same penalty, task loss and gradients as with the torch backend
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise", ["relative", "manifold"])
def test_lnsr_equals_torch_backend_on_tiny_bert(bd, noise):
    be, dev = bd
    if be.name == "torch":
        pytest.skip("the torch backend is the comparison")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).to(dev).train()
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(0)).to(dev)
    attn = torch.ones(3, 10, dtype=torch.long, device=dev)
    attn[1, 6:] = 0
    labels = torch.tensor([0, 1, 1], device=dev)
    results = {}
    for backend in ("torch", be.name):
        model.zero_grad(set_to_none=True)
        with lnsr.LNSR(model, sigma=0.1, noise=noise, lam=1.0, inject_at=0, backend=backend) as reg:
            torch.manual_seed(42)  # the same seed for the noise stream
            out = model(input_ids=ids, attention_mask=attn, labels=labels)
            (out.loss + reg.loss).backward()
            results[backend] = (reg.loss.detach(), out.loss.detach(),
                                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (l_t, task_t, g_t), (l_k, task_k, g_k) = results["torch"], results[be.name]
    assert l_t.item() > 0
    torch.testing.assert_close(l_k, l_t, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(task_k, task_t, rtol=1e-5, atol=1e-6)
    assert g_t.keys() == g_k.keys() and len(g_t) > 10
    for name in g_t:
        torch.testing.assert_close(g_k[name], g_t[name], rtol=1e-3, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# the streaming penalty (lnsr.ops.PenaltyStream): layer_penalty's value and gradients, one layer's
# penalty gradient at a time
# ---------------------------------------------------------------------------------------------

def _stream_case(be, dev, ys, first, keep, mask, weights, detach_clean, gen):
    """PenaltyStream vs the reference: loss = sum_j <c_j, z_j> + layer_penalty(ys[first:]) with
    random c_j standing in for the gradient from above; returns nothing, asserts."""
    dtype = ys[0].dtype
    ups = [torch.randn((keep, *y.shape[1:]), generator=gen).to(device=dev, dtype=torch.float32) for y in ys]
    xs = [y.clone().requires_grad_() for y in ys]
    stream = lnsr.ops.PenaltyStream(mask=mask, detach_clean=detach_clean, backend=be.name)
    zs = [stream.tap(x, first=first, keep=keep) for x in xs]
    assert all(z.shape[0] == keep for z in zs)
    pen = stream.loss(weights)
    assert stream.ys == []  # released once the value is computed
    above = sum((z.float() * u).sum() for z, u in zip(zs, ups))
    grads = torch.autograd.grad(above + pen, xs)
    xr = [y.clone().requires_grad_() for y in ys]
    ref = R.layer_penalty([x[first:] for x in xr], mask=mask, weights=weights, detach_clean=detach_clean)
    above_r = sum((x[:keep].float() * u).sum() for x, u in zip(xr, ups))
    grads_r = torch.autograd.grad(above_r + ref, xr)
    torch.testing.assert_close(pen.float(), ref.float(), rtol=2e-5 if dtype == torch.float32 else 1e-3, atol=1e-6,
                               msg=_msg("stream value"))
    for g, gr in zip(grads, grads_r):
        assert g.dtype == dtype and g.shape == gr.shape
        torch.testing.assert_close(g, gr, **TOL[dtype], msg=_msg("stream gradient"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [1, 33])
def test_penalty_stream_equals_layer_penalty(bd, gen, dtype, hidden):
    be, dev = bd
    for batch, noisy in ((1, 1), (3, 3), (4, 1)):  # noisy < batch: noisy_fraction's layout
        first = batch - noisy
        ys = [_randn((batch + noisy, 5, h), dtype, gen, dev) for h in (hidden, 7)]
        mask = _mask((noisy, 5), gen, dev)
        for keep in (batch + noisy, batch):  # inner blocks pass every row on; the last, the clean half
            for m, w, dc in ((mask, [0.5, 2.0], False), (None, None, True), (mask, None, True)):
                _stream_case(be, dev, ys, first, keep, m, w, dc, gen)


def test_penalty_stream_padding_and_empty_mask(bd, gen):
    """Padding may hold NaN/Inf: its penalty gradient is exactly 0 (the gradient from above passes
    through untouched); an empty mask gives 0 and adds nothing."""
    be, dev = bd
    y = _randn((4, 5, 16), torch.float32, gen, dev)
    mask = _mask((2, 5), gen, dev)
    pad = (mask == 0).repeat(2, 1)
    y[pad] = float("nan")
    y[2:][mask == 0] = float("inf")
    for m in (mask, torch.zeros_like(mask)):
        x = y.clone().requires_grad_()
        stream = lnsr.ops.PenaltyStream(mask=m, backend=be.name)
        z = stream.tap(x, first=0, keep=4)
        pen = stream.loss()
        up = torch.where(pad.unsqueeze(-1), 0.0, torch.ones_like(y))  # finite gradient from above
        (g,) = torch.autograd.grad((z * up).nansum() + pen, x)
        assert torch.isfinite(pen) and torch.isfinite(g).all(), _msg("padding")("non-finite")
        assert torch.count_nonzero(g[pad]) == 0
        if not m.any():
            assert pen.item() == 0.0 and torch.equal(g, up)


def test_penalty_stream_rejects_bad_layouts(bd, gen):
    be, dev = bd
    y = _randn((4, 5, 8), torch.float32, gen, dev)
    for kw in (dict(first=1, keep=4), dict(first=0, keep=0), dict(first=0, keep=5), dict(first=4, keep=4)):
        with pytest.raises(ValueError, match="tap needs"):
            lnsr.ops.PenaltyStream(backend=be.name).tap(y, **kw)
    with pytest.raises(ValueError, match="mask has shape"):
        lnsr.ops.PenaltyStream(mask=torch.ones(3, 5, device=dev), backend=be.name).tap(y, first=0, keep=4)
    with pytest.raises(ValueError, match="no layer"):
        lnsr.ops.PenaltyStream(backend=be.name).loss()


def test_lnsr_backward_holds_one_penalty_gradient_at_a_time(bd):
    """Inside a model, each layer's penalty gradient is made when that block's backward starts and
    is gone before the next one is made: never two alive (the fused backward made all L at once)."""
    import weakref
    be, dev = bd
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).to(dev).train()
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(0)).to(dev)
    made, alive_at_call = [], []

    def seen(out):
        alive_at_call.append(sum(r() is not None for r in made))
        made.append(weakref.ref(out))
        return out

    class Spy(TorchDispatchMode):  # lnsr._C's tap calls the op from C++: only the dispatcher sees it
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            return seen(out) if func is torch.ops.lnsr.penalty_tap_backward.default else out

    original = type(be).penalty_tap_backward
    compiled = be.name in ("cpu", "cuda")
    with pytest.MonkeyPatch.context() as mp, (Spy() if compiled else contextlib.nullcontext()):
        if not compiled:
            mp.setattr(type(be), "penalty_tap_backward", lambda self, *a, **k: seen(original(self, *a, **k)))
        with lnsr.LNSR(model, sigma=0.1, lam=1.0, inject_at=0, backend=be.name) as reg:
            out = model(input_ids=ids, labels=torch.tensor([0, 1, 1], device=dev))
            (out.loss + reg.loss).backward()
    assert len(alive_at_call) == 4 and alive_at_call == [0, 0, 0, 0], alive_at_call


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_tap_equals_python_tap(bd, gen, dtype, monkeypatch):
    """lnsr._C's tap (forward and backward in C++, no Python) is the Python ``_PenaltyTap`` bit for
    bit: values, the gradient of y, with and without mask, rows without a pair, keep < rows,
    detach_clean, and each output's gradient alone (the other one unused)."""
    be, dev = bd
    if be.name not in ("cpu", "cuda"):
        pytest.skip("the compiled tap is lnsr._C's")
    H = 7  # odd hidden size
    for first, keep, masked, detach in ((0, 6, True, False), (2, 8, False, True), (1, 3, True, False)):
        rows = first + 6  # m = 3 paired rows
        y0 = _randn((rows, 5, H), dtype, gen, dev)
        mask = _mask((3, 5), gen, dev) if masked else None
        up = _randn((keep, 5, H), dtype, gen, dev)
        results = {}
        for python_tap in (False, True):
            if python_tap:
                monkeypatch.setenv("LNSR_PYTHON_TAP", "1")
            else:
                monkeypatch.delenv("LNSR_PYTHON_TAP", raising=False)
            per_use = []
            for use in ("both", "z", "penalty"):
                y = y0.clone().requires_grad_()
                stream = lnsr.ops.PenaltyStream(mask=mask, detach_clean=detach, backend=be.name)
                z = stream.tap(y, first=first, keep=keep)
                pen = stream.loss([0.5])
                assert ("PenaltyTapFunction" in z.grad_fn.name()) == (not python_tap), z.grad_fn.name()
                loss = {"both": (z * up).sum() + pen, "z": (z * up).sum(), "penalty": 3.0 * pen}[use]
                (g,) = torch.autograd.grad(loss, y)
                per_use.append((z.detach(), pen.detach(), g))
            results[python_tap] = per_use
        for (za, pa, ga), (zb, pb, gb) in zip(results[False], results[True]):
            assert torch.equal(za, zb) and torch.equal(pa, pb)
            assert torch.equal(ga, gb), _msg(f"tap gradient first={first} keep={keep}")(f"{(ga - gb).abs().max()}")


def test_compiled_tap_rejects_bad_input():
    """lnsr._C.penalty_tap checks what it is handed, with messages that say what is expected."""
    from lnsr.ops import extension
    try:
        tap = extension.load().penalty_tap
    except ImportError:
        pytest.skip("lnsr._C is not built")
    y = torch.randn(4, 3, 8)
    with pytest.raises(RuntimeError, match=r"\[first \+ 2m, \.\.\., H\]"):
        tap(y, None, 1, 4, False)
    with pytest.raises(RuntimeError, match="keep"):
        tap(y, None, 0, 5, False)
    with pytest.raises(TypeError, match="plain torch.Tensor"):
        tap(y.as_subclass(type("Sub", (torch.Tensor,), {})), None, 0, 4, False)  # may override dispatch
    with pytest.raises(TypeError):
        tap(y, None, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_tap_backward_is_the_reference_bit_for_bit(dtype):
    """lnsr._C's CPU kernel of one layer's streaming gradient does the reference's fp32 arithmetic in
    the same order, so it must equal it exactly: every dtype, gradient from above absent / on some
    rows / on all rows, rows without a pair, detach_clean, and a mask whose padding holds NaN/Inf."""
    be = dispatch.resolve_backend("cpu", "cpu") if "cpu" in lnsr.ops.available_backends() else None
    if be is None:
        pytest.skip("lnsr._C is not built")
    gen = torch.Generator().manual_seed(RUN_SEED)
    for first, grad_rows, detach, masked, H in ((0, None, False, True, 33), (2, 8, True, False, 64),
                                                (3, 2, False, True, 7), (0, 6, False, False, 1)):
        rows = first + 6
        y = _randn((rows, 4, H), dtype, gen, "cpu")
        mask = _mask((3, 4), gen, "cpu") if masked else None
        if masked:
            pad = (mask == 0)
            y[first:first + 3][pad] = float("nan")
            y[first + 3:][pad] = float("inf")
        grad = None if grad_rows is None else _randn((grad_rows, 4, H), dtype, gen, "cpu")
        coef = torch.rand((), generator=gen) + 0.1
        got = be.penalty_tap_backward(grad, coef, y, first, mask, detach)
        want = R.penalty_tap_backward(grad, coef, y, first, mask, detach)
        assert got.dtype == want.dtype == dtype
        assert torch.equal(got, want), _msg(f"tap backward first={first} grad_rows={grad_rows}")(
            f"{(got.float() - want.float()).abs().max()}")
