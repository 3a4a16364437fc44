"""The torch reference ops: the noise stream against Triton's and Random123's known answer, and
perturb / layer_penalty against their definitions (gradcheck, dtypes, awkward shapes), and the
public API's input checks.  What every backend must do is in test_backend_contract.py."""
import math

import pytest
import torch

from lnsr import ops
from lnsr.ops import reference

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


@triton.jit
def _randn4x_stream(out_ptr, seed, n, BLOCK: tl.constexpr):
    # docs/design.md §2 verbatim: one tl.randn4x call per counter c = i // 4, laid out n1 n2 n3 n4.
    pid = tl.program_id(0)
    c = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    n1, n2, n3, n4 = tl.randn4x(seed, c)
    z = tl.interleave(tl.interleave(n1, n3), tl.interleave(n2, n4))
    offs = pid * BLOCK * 4 + tl.arange(0, 4 * BLOCK)
    tl.store(out_ptr + offs, z, mask=offs < n)


def _triton_stream(numel, seed, device):
    out = torch.full((numel,), float("nan"), device=device)
    block = 1024
    _randn4x_stream[(triton.cdiv(numel, 4 * block),)](out, seed, numel, BLOCK=block)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, 123456789012345, 2**63 + 12345])
def test_noise_equals_triton_randn4x(seed):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    numel = 4 * 1024 + 1003  # not a multiple of 1024, nor of 4
    expected = _triton_stream(numel, seed, device)
    got = ops.noise(numel, seed, device=device)
    assert got.shape == (numel,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()


@triton.jit
def _randn4x_at(out_ptr, seed, c0, n_calls, BLOCK: tl.constexpr):
    # tl.randn4x at the int64 counters c0 + k: past 2**32 the high word is the second counter word
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n1, n2, n3, n4 = tl.randn4x(seed, c0 + k.to(tl.int64))
    z = tl.interleave(tl.interleave(n1, n3), tl.interleave(n2, n4))
    offs = tl.program_id(0) * BLOCK * 4 + tl.arange(0, 4 * BLOCK)
    tl.store(out_ptr + offs, z, mask=offs < 4 * n_calls)


@pytest.mark.parametrize("seed", [7, 2**63 + 12345])
def test_noise_equals_the_pinned_triton_past_2_32_counters(seed):
    """The installed Triton is the pinned one (setup.py: triton>=3.4, lnsr.kernels.TRITON_MIN) and
    its randn4x is the reference stream where the counter's high word is not 0 (offsets of 2**34
    elements and more, which older Tritons dropped)."""
    from lnsr.kernels import TRITON_MIN, _version_tuple

    assert _version_tuple(triton.__version__) >= TRITON_MIN, f"triton {triton.__version__} is below the pin"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c0, n_calls = 2**32 - 40, 96  # crosses the word boundary
    out = torch.full((4 * n_calls,), float("nan"), device=device)
    _randn4x_at[(3,)](out, seed, c0, n_calls, BLOCK=32)
    counter = torch.arange(c0, c0 + n_calls, dtype=torch.int64, device=device)
    i1, i2, i3, i4 = reference.philox4x32(seed, counter)
    n1, n2 = reference._box_muller(reference._uniform(i1), reference._uniform(i2))
    n3, n4 = reference._box_muller(reference._uniform(i3), reference._uniform(i4))
    want = torch.stack([n1, n2, n3, n4], dim=-1).reshape(-1)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # the high word matters: the same low words with a zero high word are another stream
    low = reference.philox4x32(seed, counter & 0xFFFFFFFF)[0]
    assert not torch.equal(low[-8:], i1[-8:])


def test_noise_is_standard_normal_and_prefix_stable():
    z = ops.noise(200_003, 7)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert torch.equal(ops.noise(5, 7), z[:5])           # z[0:numel] of one stream
    assert not torch.equal(ops.noise(5, 8), z[:5])
    assert ops.noise(0, 7).numel() == 0
    assert ops.noise(3, 7, dtype=torch.float16).dtype == torch.float16


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, "3", None])
def test_noise_rejects_bad_seeds(bad):
    with pytest.raises((TypeError, ValueError), match="seed"):
        ops.noise(4, bad)


def test_philox_known_answer():
    # Random123's published known-answer test for philox4x32_10: counter 0, key 0.
    c = reference.philox4x32(0, torch.zeros(1, dtype=torch.int64))
    assert [int(x) for x in c] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


# -- perturb -------------------------------------------------------------------------------------

def _h(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)


@pytest.mark.parametrize("kind", ops.NOISE_KINDS)
@pytest.mark.parametrize("shape", [(1, 1, 7), (2, 5, 1), (3, 4, 33), (2, 384)])
def test_perturb_definition(kind, shape):
    h = _h(shape)
    seed, sigma = 42, 0.2
    out = ops.perturb(h, seed, sigma=sigma, kind=kind, backend="torch")
    b = shape[0]
    assert out.shape == (2 * b, *shape[1:]) and out.dtype == h.dtype
    assert torch.equal(out[:b], h)
    n = h.numel()
    z = ops.noise(n if kind != "manifold" else 0, seed).view(-1)
    eps = out[b:] - h
    if kind == "gaussian":
        torch.testing.assert_close(eps, sigma * z.view(shape), rtol=1e-5, atol=1e-5)
    elif kind == "relative":
        rms = h.pow(2).mean(-1, keepdim=True).sqrt()
        torch.testing.assert_close(eps, sigma * rms * z.view(shape), rtol=1e-4, atol=1e-5)
    else:  # manifold: eps lies in the span of the centred anchor tokens
        tokens = h.reshape(-1, shape[-1])
        anchors = reference.manifold_anchors(None, shape, seed, 64, h.device)
        a = tokens[anchors] - tokens[anchors].mean(0)
        proj = torch.linalg.lstsq(a.T.double(), eps.reshape(-1, shape[-1]).T.double()).solution
        resid = eps.reshape(-1, shape[-1]).T.double() - a.T.double() @ proj
        assert resid.norm() <= 1e-4 * max(eps.norm().item(), 1e-12) + 1e-6


def test_relative_noise_scale_is_sigma_times_norm():
    h = _h((4, 64, 256))
    eps = ops.perturb(h, 3, sigma=0.05, kind="relative")[4:] - h
    ratio = eps.norm(dim=-1) / h.norm(dim=-1)
    assert abs(ratio.mean().item() - 0.05) < 0.002


def test_manifold_uses_only_valid_tokens_and_empty_mask_gives_no_noise():
    h = _h((2, 6, 8))
    mask = torch.zeros(2, 6, dtype=torch.long)
    assert torch.equal(ops.perturb(h, 1, sigma=1.0, kind="manifold", mask=mask)[2:], h)
    mask[0, :3] = 1
    idx = reference.manifold_anchors(mask, h.shape, 1, 64, h.device)
    assert sorted(idx.tolist()) == [0, 1, 2]
    big = h.clone()
    big[1] = 1e6  # invalid tokens must not enter the span
    eps = ops.perturb(big, 1, sigma=1.0, kind="manifold", mask=mask)[2:] - big
    assert eps.abs().max() < 100


@pytest.mark.parametrize("kind", ops.NOISE_KINDS)
def test_perturb_gradcheck(kind):
    h = _h((2, 3, 5), dtype=torch.float64).requires_grad_()
    if kind == "gaussian":  # the other kinds' eps depends on h, but is detached by definition
        torch.autograd.gradcheck(lambda x: ops.perturb(x, 5, sigma=0.3, kind=kind), (h,))
    g = torch.randn(4, 3, 5, dtype=torch.float64)
    (grad,) = torch.autograd.grad(ops.perturb(h, 5, sigma=0.3, kind=kind), h, g)
    torch.testing.assert_close(grad, g[:2] + g[2:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_perturb_low_precision_matches_fp32(dtype):
    h = _h((2, 7, 48), dtype)
    out = ops.perturb(h, 11, sigma=0.05)
    ref = ops.perturb(h.float(), 11, sigma=0.05)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_perturb_rejects_bad_input():
    h = _h((2, 3, 4))
    with pytest.raises(ValueError, match="sigma"):
        ops.perturb(h, 1, sigma=-0.1)
    with pytest.raises(ValueError, match="sigma"):
        ops.perturb(h, 1, sigma=float("nan"))
    with pytest.raises(ValueError, match="noise kind"):
        ops.perturb(h, 1, sigma=0.1, kind="uniform")
    with pytest.raises(ValueError, match="mask"):
        ops.perturb(h, 1, sigma=0.1, mask=torch.ones(2, 4))
    with pytest.raises(TypeError, match="float"):
        ops.perturb(h.long(), 1, sigma=0.1)
    with pytest.raises(ValueError, match="backend"):
        ops.perturb(h, 1, sigma=0.1, backend="tpu")


# -- layer_penalty ---------------------------------------------------------------------------------

def test_layer_penalty_gradients_and_detach_clean():
    ys = [torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.float64)
    torch.autograd.gradcheck(lambda *t: ops.layer_penalty(list(t), mask=mask, weights=[1, 2, 0.5]), tuple(ys))
    p = ops.layer_penalty(ys, mask=mask, detach_clean=True)
    grads = torch.autograd.grad(p, ys)
    for g in grads:
        assert torch.equal(g[:2], torch.zeros_like(g[:2]))
        assert g[2:].abs().sum() > 0
        assert torch.equal(g[3], torch.zeros_like(g[3]))  # the all-zero mask row gets nothing


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_penalty_accumulates_in_fp32(dtype):
    ys = [torch.randn(8, 16, 64).to(dtype) for _ in range(4)]
    p = ops.layer_penalty(ys)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, ops.layer_penalty([y.float() for y in ys]), rtol=1e-5, atol=0)


def test_layer_penalty_rejects_bad_input():
    y = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="at least one"):
        ops.layer_penalty([])
    with pytest.raises(ValueError, match="2B"):
        ops.layer_penalty([torch.randn(3, 3, 5)])
    with pytest.raises(ValueError, match="mask"):
        ops.layer_penalty([y], mask=torch.ones(4, 3))
    with pytest.raises(ValueError, match="weights"):
        ops.layer_penalty([y, y], weights=[1.0])
    with pytest.raises(ValueError, match="weights"):
        ops.layer_penalty([y], weights=[math.inf])
    with pytest.raises(ValueError, match="token dims"):
        ops.layer_penalty([y, torch.randn(4, 2, 5)])
