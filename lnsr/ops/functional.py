"""The lnsr ops ``perturb`` and ``layer_penalty`` (docs/design.md §2, §4), exported by ``lnsr.ops``.

They validate their inputs and dispatch to a backend (``lnsr.ops.dispatch``); ``noise`` is the
reference's own (``lnsr.ops.reference``, the ground truth every backend is tested against).  The
streaming form of ``layer_penalty`` is ``lnsr.ops.stream.PenaltyStream``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import dispatch, reference
from .backend import DENSE_KINDS, Backend, weights_tensor
from .dispatch import resolve_backend
from .reference import DEFAULT_ANCHORS, NOISE_KINDS, check_seed

__all__ = ["perturb", "layer_penalty"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_sigma(sigma) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"sigma must be a float >= 0, got {type(sigma).__name__}")
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite float >= 0, got {sigma}")
    return float(sigma)


def _check_float(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def _check_mask(mask, token_shape, what: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor of shape {tuple(token_shape)} or None, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(token_shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but {what} needs {tuple(token_shape)} "
                         f"(batch and token dims of the clean half); pass the [batch, seq] attention mask")


def perturb(h: torch.Tensor, seed: int, *, sigma: float, kind: str = "relative",
            mask: torch.Tensor | None = None, n_anchors: int = DEFAULT_ANCHORS,
            backend: str = "auto") -> torch.Tensor:
    """``cat([h, h + eps])`` along dim 0 with ``eps`` drawn from the noise stream of ``seed``.

    ``h``: ``[B, ..., H]``.  ``kind``: ``gaussian`` (``sigma * z``), ``relative`` (``sigma *
    rms(h) * z`` per token) or ``manifold`` (Gaussian in the span of ``n_anchors`` centred valid
    tokens).  ``mask`` (``[B, ...]``) only selects the manifold anchors.  Backward: ``g[:B] + g[B:]``.
    ``seed``: an int in ``[0, 2**64)`` or a one-element integer tensor holding one; while
    torch.compile traces, an int64 tensor on ``h``'s device is taken as the seed's 64 bits and read
    by the kernel (a device seed, docs/design.md §2), so its value is not checked there.
    """
    _check_float(h, "h")
    if h.dim() < 2:
        raise ValueError(f"h must have shape [batch, ..., hidden], got {tuple(h.shape)}")
    traced_seed = isinstance(seed, torch.Tensor) and torch.compiler.is_compiling()
    seed = _check_seed_tensor(seed, h.device) if traced_seed else check_seed(seed)
    sigma = check_sigma(sigma)
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {', '.join(NOISE_KINDS)}")
    if isinstance(n_anchors, bool) or not isinstance(n_anchors, int) or n_anchors < 1:
        raise ValueError(f"n_anchors must be a positive int, got {n_anchors!r}")
    _check_mask(mask, h.shape[:-1], "h")
    if traced_seed:  # the seed stays a graph input: a new value each step does not recompile
        return torch.ops.lnsr_seeded.perturb(h, seed, sigma, kind, mask, n_anchors, backend)
    if backend == "auto" and kind in DENSE_KINDS and not Backend.uses_reference(h):
        hd = h.detach()
        impl = dispatch.resolve_for(
            "perturb", dispatch.input_class(kind, h.dtype, h.shape[-1], h.numel()), h.device,
            lambda be: be.perturb_backward(be.perturb_forward(hd, 0, sigma, kind)))
    else:
        impl = resolve_backend(backend, h.device)
    return impl.perturb(h, seed, sigma=sigma, kind=kind, mask=mask, n_anchors=n_anchors)


def _check_seed_tensor(seed: torch.Tensor, device: torch.device) -> torch.Tensor:
    # While tracing, a tensor seed is checked by its metadata only (.item() would break the graph).
    if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
        raise TypeError(f"seed must be a Python int or a one-element integer tensor, got a {seed.dtype} tensor "
                        f"of shape {tuple(seed.shape)}")
    if seed.device.type != "cpu" and not (reference.is_device_seed(seed) and seed.device == device):
        raise ValueError(f"a tensor seed must be on the CPU (read on the host) or be an int64 tensor on h's device "
                         f"{device} holding the seed's 64 bits (read by the kernel); got a {seed.dtype} tensor on "
                         f"{seed.device}")
    return seed


# ``perturb`` with the seed as a tensor, as one opaque op.  Used while torch.compile traces
# (``LNSR`` passes its per-step seed this way): an int seed would be a constant of the graph,
# guarded on, and each step's new seed would compile a new graph.  A device seed (an int64 tensor
# on h's device holding the seed's bits) goes to the kernels unread, so that a CUDA graph captured
# from the compiled step draws new noise on each replay; a CPU tensor is read on the host.
@torch.library.custom_op("lnsr_seeded::perturb", mutates_args=())
def _perturb_seeded(h: torch.Tensor, seed: torch.Tensor, sigma: float, kind: str, mask: torch.Tensor | None,
                    n_anchors: int, backend: str) -> torch.Tensor:
    impl = resolve_backend(backend, h.device)
    if reference.is_device_seed(seed) and seed.device == h.device:
        out = impl.perturb_seeded(h, seed, sigma=sigma, kind=kind, mask=mask, n_anchors=n_anchors)
    else:
        out = impl.perturb(h, check_seed(seed), sigma=sigma, kind=kind, mask=mask, n_anchors=n_anchors)
    return out.clone() if out._base is not None else out  # a custom op may not return a view of anything


@_perturb_seeded.register_fake
def _(h, seed, sigma, kind, mask, n_anchors, backend):
    return h.new_empty((2 * h.shape[0], *h.shape[1:]))


def _perturb_seeded_backward(ctx, grad):
    # eps is detached for every kind (docs/design.md §1): the gradient is g[:B] + g[B:], in fp32
    b = grad.shape[0] // 2
    acc = torch.promote_types(grad.dtype, torch.float32)
    return (grad[:b].to(acc) + grad[b:].to(acc)).to(grad.dtype), None, None, None, None, None, None


_perturb_seeded.register_autograd(_perturb_seeded_backward)


def layer_penalty(ys: Sequence[torch.Tensor], *, mask: torch.Tensor | None = None,
                  weights: Sequence[float] | None = None, detach_clean: bool = False,
                  backend: str = "auto") -> torch.Tensor:
    """``sum_j w_j / N * sum_{b,t} m[b,t] * ||y_j[B+b,t] - y_j[b,t]||^2`` as an fp32 scalar.

    ``ys``: tensors ``[2B, ..., H_j]`` (clean half first) with the same batch and token dims;
    ``mask``: ``[B, ...]`` or None (then ``N`` counts every token); ``weights``: one float per
    tensor (default 1).  An all-zero mask gives 0.
    """
    if isinstance(ys, torch.Tensor):
        ys = [ys]
    ys = list(ys)
    if not ys:
        raise ValueError("layer_penalty needs at least one tensor in ys")
    first = ys[0]
    _check_float(first, "ys[0]")
    if first.dim() < 2 or first.shape[0] % 2:
        raise ValueError(f"ys[0] must have shape [2B, ..., H] (clean half first), got {tuple(first.shape)}")
    tokens, device = first.shape[:-1], first.device
    for j, y in enumerate(ys):
        # one cheap test per tensor (this runs every step); the messages are built only on failure
        if not (isinstance(y, torch.Tensor) and y.dtype in FLOAT_DTYPES and y.shape[:-1] == tokens
                and y.device == device):
            _check_float(y, f"ys[{j}]")
            raise ValueError(f"ys[{j}] has shape {tuple(y.shape)} on {y.device}; every tensor needs the batch "
                             f"and token dims {tuple(tokens)} of ys[0] and the same device")
    _check_mask(mask, (first.shape[0] // 2, *first.shape[1:-1]), "ys")
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != len(ys):
            raise ValueError(f"weights has {len(weights)} entries for {len(ys)} tensors in ys")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be finite, got {weights}")
    if backend == "auto" and not Backend.uses_reference(*ys):
        impl = dispatch.resolve_for(
            "layer_penalty", dispatch.input_class(len(ys), first.dtype, first.shape[-1], first.numel(),
                                                  mask is not None), first.device,
            lambda be: _penalty_round_trip(be, ys, mask, detach_clean))
    else:
        impl = resolve_backend(backend, first.device)
    return impl.layer_penalty(ys, mask=mask, weights=weights, detach_clean=bool(detach_clean))


def _penalty_round_trip(be, ys, mask, detach_clean):
    # what ``auto`` times for layer_penalty: the backend's forward and backward kernels, no autograd
    ys = [y.detach() for y in ys]
    w = weights_tensor(None, len(ys), ys[0].device)
    loss, count = be.penalty_forward(ys, mask, w, bool(detach_clean))
    return be.penalty_backward(torch.ones_like(loss), count, ys, mask, w, bool(detach_clean))
