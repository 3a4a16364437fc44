"""Torch reference of every lnsr op: the single ground truth.

Every backend (Triton in ``lnsr.kernels``, C++/CUDA in ``lnsr._C``) is tested against the
functions in this file, and the benchmarks compare against them.  They are written for
clarity, with plain autograd, not for speed.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

# ---------------------------------------------------------------------------------------------
# The noise stream (docs/design.md §2): Philox4x32-10 keyed by the 64-bit seed, counter (c_lo, c_hi, 0, 0)
# for c = i // 4, the 4 outputs -> uniforms as tl.rand -> two Box-Muller pairs.  Element i of the
# perturbed tensor takes output r = i % 4.  Integer arithmetic is done in int64 with 32-bit
# products split into 16-bit halves so that nothing overflows.
# ---------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_N_ROUNDS = 10
# Triton's uint_to_uniform_float scale for 32-bit integers, and its Box-Muller constants.
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586
_MIN_U = 1.0e-7

SEED_MAX = 2**64 - 1


def check_seed(seed) -> int:
    """Seeds are Python ints in [0, 2**64); anything else is a TypeError/ValueError."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point:
            raise TypeError("seed must be a Python int or a one-element integer tensor")
        seed = int(seed.item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int in [0, 2**64), got {type(seed).__name__}")
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit words of the 64-bit product of the constant a and the uint32 values b."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    lo_part = a_lo * b                       # < 2**48
    t = a_hi * b + (lo_part >> 16)           # (a*b) >> 16, < 2**49
    hi = t >> 16
    lo = ((t & 0xFFFF) << 16) | (lo_part & 0xFFFF)
    return hi, lo


def is_device_seed(seed) -> bool:
    """A *device seed*: a one-element int64 tensor holding the seed's 64 bits (``seed_bits``), read
    where it lives, never on the host, so that a captured CUDA graph draws new noise each replay
    when the tensor is refilled (docs/design.md §2)."""
    return isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() == 1


def _key(seed):
    """The two 32-bit Philox key words of an int seed or of a device seed (then 0-d int64 tensors)."""
    if is_device_seed(seed):
        s = seed.reshape(())
        return s & _MASK32, (s >> 32) & _MASK32  # the arithmetic shift's sign bits are masked off
    seed = check_seed(seed)
    return seed & _MASK32, (seed >> 32) & _MASK32


def philox4x32(seed, counter: torch.Tensor):
    """The 4 uint32 outputs (as int64 tensors) of Philox4x32-10 for counters (c_lo, c_hi, 0, 0).
    ``seed``: an int in [0, 2**64) or a device seed (``is_device_seed``)."""
    k0, k1 = _key(seed)
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform(x: torch.Tensor) -> torch.Tensor:
    # tl.uint_to_uniform_float: bitcast to int32, fold negatives with ~x, scale in fp32.
    x = torch.where(x >= 2**31, x - 2**32, x)
    x = torch.where(x < 0, -x - 1, x)
    # torch.full: a fill on the device, not a host copy (which a CUDA graph capture forbids)
    return x.to(torch.float32) * torch.full((), _UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def _box_muller(u1: torch.Tensor, u2: torch.Tensor):
    u1 = torch.clamp_min(u1, _MIN_U)
    th = u2 * torch.full((), _TWO_PI, dtype=torch.float32, device=u2.device)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def noise(numel: int, seed, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """z[0:numel] of the lnsr noise stream for ``seed`` (standard normals, computed in fp32).
    ``seed``: an int in [0, 2**64), or a device seed (``is_device_seed``) on ``device``."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    if not is_device_seed(seed):
        seed = check_seed(seed)
    n_calls = (numel + 3) // 4
    counter = torch.arange(n_calls, dtype=torch.int64, device=device)
    i1, i2, i3, i4 = philox4x32(seed, counter)
    n1, n2 = _box_muller(_uniform(i1), _uniform(i2))
    n3, n4 = _box_muller(_uniform(i3), _uniform(i4))
    z = torch.stack([n1, n2, n3, n4], dim=-1).reshape(-1)[:numel]
    return z.to(dtype)


# ---------------------------------------------------------------------------------------------
# perturb: cat([h, h + eps]) with eps detached (docs/design.md §1 noise kinds, §4 contract)
# ---------------------------------------------------------------------------------------------

NOISE_KINDS = ("gaussian", "relative", "manifold")
DEFAULT_ANCHORS = 64


def token_rms(h: torch.Tensor) -> torch.Tensor:
    """Per-token root mean square over the last dim, in fp32, shape [..., 1]."""
    return h.float().pow(2).mean(dim=-1, keepdim=True).sqrt()


def manifold_anchors(mask: torch.Tensor | None, shape, seed: int, n_anchors: int, device) -> torch.Tensor:
    """Flat token indices of the anchors: ``n_anchors`` valid tokens drawn uniformly without
    replacement (all valid tokens when there are fewer), chosen by a CPU generator seeded with
    ``seed`` so that every backend and every recomputation picks the same ones."""
    n_tokens = math.prod(shape[:-1])
    if mask is None:
        valid = torch.arange(n_tokens, device="cpu")
    else:
        valid = torch.nonzero(mask.reshape(-1).detach().cpu() != 0).reshape(-1)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed & 0x7FFFFFFFFFFFFFFF)
    pick = torch.randperm(valid.numel(), generator=gen)[: min(n_anchors, valid.numel())]
    return valid[pick].sort().values.to(device)


def manifold_eps(h: torch.Tensor, seed: int, *, sigma: float, mask: torch.Tensor | None = None,
                 n_anchors: int = DEFAULT_ANCHORS, noise_fn=None) -> torch.Tensor:
    """The detached fp32 ``manifold`` noise: Gaussian in the span of the centred anchor tokens.

    Written once for every backend: ``noise_fn(numel, seed, device=...)`` is the backend's own
    noise kernel (default: this file's ``noise``), the rest (anchors, centring, one GEMM) is shared.
    """
    noise_fn = noise if noise_fn is None else noise_fn
    with torch.no_grad():
        hid = h.shape[-1]
        anchors = manifold_anchors(mask, h.shape, seed, n_anchors, h.device) if h.numel() else h.new_empty(0)
        a = anchors.numel()
        if a == 0:  # no valid token (or nothing at all): nothing to span, no noise
            return torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        rows = h.reshape(-1, hid).float()[anchors]
        centred = rows - rows.mean(dim=0, keepdim=True)
        coef = noise_fn(math.prod(h.shape[:-1]) * a, seed, device=h.device).view(-1, a)
        return ((sigma / math.sqrt(a)) * (coef @ centred)).view(h.shape)


def make_eps(h: torch.Tensor, seed, *, sigma: float, kind: str = "relative",
             mask: torch.Tensor | None = None, n_anchors: int = DEFAULT_ANCHORS) -> torch.Tensor:
    """The detached fp32 noise ``eps`` (same shape as ``h``) that ``perturb`` adds (``seed``: an int
    or a device seed on ``h``'s device)."""
    with torch.no_grad():
        if kind == "gaussian":
            return sigma * noise(h.numel(), seed, device=h.device).view(h.shape)
        if kind == "relative":
            z = noise(h.numel(), seed, device=h.device).view(h.shape)
            return (sigma * token_rms(h)) * z
        if kind == "manifold":  # the anchors are drawn on the host: a device seed is read there
            if is_device_seed(seed):
                seed = int(seed.item()) % 2**64
            return manifold_eps(h, seed, sigma=sigma, mask=mask, n_anchors=n_anchors)
    raise ValueError(f"unknown noise kind {kind!r}; choose one of {', '.join(NOISE_KINDS)}")


def add_noise(h: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``cat([h, h + eps])`` along dim 0, the sum in fp32 (fp64 for fp64 inputs, for gradcheck)."""
    acc = torch.promote_types(h.dtype, torch.float32)
    noisy = (h.to(acc) + eps.to(acc)).to(h.dtype)
    return torch.cat([h, noisy], dim=0)


def perturb(h: torch.Tensor, seed: int, *, sigma: float, kind: str = "relative",
            mask: torch.Tensor | None = None, n_anchors: int = DEFAULT_ANCHORS) -> torch.Tensor:
    """``cat([h, h + eps])`` along dim 0; the gradient w.r.t. ``h`` is ``g[:B] + g[B:]``."""
    return add_noise(h, make_eps(h, seed, sigma=sigma, kind=kind, mask=mask, n_anchors=n_anchors))


# ---------------------------------------------------------------------------------------------
# layer_penalty: sum_j w_j / N * sum_{b,t} m * ||noisy_j - clean_j||^2, fp32 accumulation
# ---------------------------------------------------------------------------------------------

def pair_penalty(cleans: Sequence[torch.Tensor], noisys: Sequence[torch.Tensor], *,
                 mask: torch.Tensor | None = None, weights: Sequence[float] | None = None,
                 detach_clean: bool = False) -> torch.Tensor:
    """``sum_j w_j / N * sum m * ||noisy_j - clean_j||^2`` over paired tensors ``[B, ..., H]``:
    the definition, as a Python loop of masked squared errors."""
    acc = torch.promote_types(cleans[0].dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    total = torch.zeros((), dtype=acc, device=cleans[0].device)
    m = None if mask is None else mask.to(acc)
    n = None if m is None else m.sum().clamp_min(1.0)  # an empty mask gives 0, not NaN
    for j, (clean, noisy) in enumerate(zip(cleans, noisys)):
        if detach_clean:
            clean = clean.detach()
        d = noisy.to(acc) - clean.to(acc)
        if m is None:  # an empty batch gives 0 like an empty mask (N = max(N, 1)), not NaN
            sq = d.pow(2).sum(dim=-1)
            term = sq.mean() if sq.numel() else sq.sum()
        else:
            # masked tokens contribute nothing and get a zero gradient, even when non-finite
            # (padding may hold anything): they are dropped before anything is computed from them
            d = torch.where((m != 0).unsqueeze(-1), d, 0.0)
            term = (d.pow(2).sum(dim=-1) * m).sum() / n
        total = total + (1.0 if weights is None else weights[j]) * term
    return total


def layer_penalty(ys: Sequence[torch.Tensor], *, mask: torch.Tensor | None = None,
                  weights: Sequence[float] | torch.Tensor | None = None,
                  detach_clean: bool = False) -> torch.Tensor:
    """Masked, weighted mean squared per-token distance between the halves of each ``y``.

    ``ys``: tensors of shape ``[2B, ..., H]``, clean half first.  ``mask``: ``[B, ...]`` (the
    token dims of the clean half) or None.  Returns an fp32 scalar; 0 when the mask is empty.
    """
    b = ys[0].shape[0] // 2
    return pair_penalty([y[:b] for y in ys], [y[b:] for y in ys], mask=mask, weights=weights,
                        detach_clean=detach_clean)


def penalty_tap_backward(grad: torch.Tensor | None, coef: torch.Tensor, y: torch.Tensor, first: int,
                         mask: torch.Tensor | None = None, detach_clean: bool = False) -> torch.Tensor:
    """The gradient reaching one layer's output ``y`` under the streaming penalty (docs/design.md §4).

    ``y``: ``[first + 2m, ..., H]``: rows ``first:first+m`` are clean, the last ``m`` their noisy
    copies (rows ``:first`` have none).  ``grad``: the gradient of ``y[:keep]`` from above (``keep <=
    first + 2m`` rows; None = zeros).  ``coef``: a scalar, the penalty's gradient times ``w_j / N``.
    Returns ``grad`` padded with zeros to ``y``'s rows plus ``coef`` times the gradient of
    ``sum m ||noisy - clean||^2`` (``2 m (noisy - clean)`` on the noisy rows, its negative on the
    clean rows unless ``detach_clean``), in ``y``'s dtype; masked tokens get nothing from it.
    """
    acc = torch.promote_types(y.dtype, torch.float32)
    m = (y.shape[0] - first) // 2
    clean, noisy = y[first:first + m], y[first + m:]
    d = noisy.to(acc) - clean.to(acc)  # the one [m, ..., H] temporary (in place from here)
    if mask is not None:  # padding may hold anything: it is zeroed after the product, never used
        w = mask.to(acc).unsqueeze(-1)
        d.mul_(w).masked_fill_(w == 0, 0.0)
    d.mul_(2.0 * coef.to(acc))
    # grad's rows as they are (autograd hands a gradient in y's dtype); the additions are computed
    # in fp32 and rounded once, as the kernels do
    if grad is not None and grad.shape[0] == y.shape[0]:
        out = grad.to(y.dtype, copy=True)
    else:
        out = torch.zeros(y.shape, dtype=y.dtype, device=y.device)
        if grad is not None:
            out[:grad.shape[0]] = grad
    out[first + m:] += d
    if not detach_clean:
        out[first:first + m] -= d
    return out
