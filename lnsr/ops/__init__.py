"""The lnsr ops: ``noise``, ``perturb``, ``layer_penalty`` (docs/design.md §2, §4).

These functions validate their inputs and dispatch to a backend (``lnsr.ops.dispatch``).  The
torch reference in ``lnsr.ops.reference`` is the ground truth that every backend is tested against.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from . import dispatch, reference
from .backend import DENSE_KINDS, Backend, weights_tensor
from .dispatch import BACKENDS, available_backends, register_loader, resolve_backend
from .reference import DEFAULT_ANCHORS, NOISE_KINDS, SEED_MAX, check_seed, make_eps, noise

__all__ = ["noise", "perturb", "layer_penalty", "PenaltyStream", "make_eps", "available_backends", "resolve_backend",
           "register_loader", "BACKENDS", "NOISE_KINDS", "SEED_MAX", "reference"]

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


# ---------------------------------------------------------------------------------------------
# The streaming penalty (docs/design.md §4): what ``LNSR`` uses inside a model.  ``layer_penalty``
# returns every layer's gradient at once when its backward starts: L full tensors alive together,
# each then sliced and added into its block's gradient.  Here each block output passes through a
# tap, an identity whose backward adds that layer's penalty gradient into the gradient already
# flowing to the block, so one layer's penalty gradient is alive at a time.  The penalty's value is
# computed once, without a graph; its gradient reaches tap j as the scalar ``dP * w_j / N``
# through a zero scalar the tap returns beside the block output.
# ---------------------------------------------------------------------------------------------

class _PenaltyTap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, mask, first, keep, detach_clean, impl):
        ctx.save_for_backward(y, mask)
        ctx.first, ctx.detach_clean, ctx.impl = first, detach_clean, impl
        return y[:keep], y.new_zeros((), dtype=torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, coef):
        y, mask = ctx.saved_tensors
        gy = ctx.impl.penalty_tap_backward(grad, coef, y, ctx.first, mask, ctx.detach_clean)
        return gy, None, None, None, None, None


def _compiled_tap(impl, mask):
    """lnsr._C when ``impl`` is one of its backends and the mask a plain tensor or None, else None:
    its ``penalty_tap`` is ``_PenaltyTap`` with forward and backward in C++, its
    ``penalty_stream_loss`` the loss's node.  Traced code (torch.compile), tensor subclasses and
    reference dtypes keep the Python forms, which Dynamo traces and which dispatch per backend.
    ``LNSR_PYTHON_TAP=1`` forces them."""
    from .extension import ExtensionBackend, load
    if (not isinstance(impl, ExtensionBackend) or os.environ.get("LNSR_PYTHON_TAP") == "1"
            or not (mask is None or type(mask) is torch.Tensor)):
        return None
    mod = load()
    # None with an lnsr._C built before the C++ tap
    return mod if hasattr(mod, "penalty_tap") and hasattr(mod, "penalty_stream_loss") else None


class PenaltyStream:
    """``layer_penalty`` over block outputs met one at a time, with a streaming backward.

    >>> stream = PenaltyStream(mask=m, backend="auto")        # m: [m_rows, ...] or None
    >>> y = stream.tap(y, first=B - m_rows, keep=2 * m_rows + B - m_rows)   # per block, in order
    >>> p = stream.loss(weights)                               # == layer_penalty(ys, mask, weights)

    ``tap(y, first, keep)``: ``y`` is ``[first + 2m, ..., H]``, rows ``first:first+m`` clean and
    the last ``m`` their noisy copies; returns ``y[:keep]`` (a view, for the rest of the model) and
    records the layer unless ``record=False`` (a recomputation under activation checkpointing
    must save what the forward saved, but adds no layer).  ``loss(weights)``: the fp32 scalar of
    ``layer_penalty([y[first:] ...], mask, weights, detach_clean)``, values and gradients alike;
    the recorded layers are released (``ys`` is empty afterwards).
    """

    def __init__(self, *, mask: torch.Tensor | None = None, detach_clean: bool = False, backend: str = "auto"):
        self.mask, self.detach_clean, self.backend = mask, bool(detach_clean), backend
        self.ys: list[torch.Tensor] = []      # the paired rows of each layer, detached (for the value)
        self._coefs: list[torch.Tensor] = []  # the zero scalars through which dP * w_j / N arrives
        self._impl = None
        self._fast = None  # lnsr._C when the backend is one of its (_compiled_tap)
        self._python_taps = False  # whether a layer took _PenaltyTap (then loss keeps its Python form)

    def tap(self, y: torch.Tensor, *, first: int, keep: int, record: bool = True) -> torch.Tensor:
        rows = y.shape[0] - first
        if y.dim() < 2 or first < 0 or rows <= 0 or rows % 2 or not 0 < keep <= y.shape[0]:
            raise ValueError(f"tap needs y of [first + 2m, ..., H] rows and 0 < keep <= its rows, got "
                             f"{tuple(y.shape)}, first={first}, keep={keep}")
        if self.mask is not None and tuple(self.mask.shape) != (rows // 2, *y.shape[1:-1]):
            raise ValueError(f"mask has shape {tuple(self.mask.shape)} but y's paired rows need "
                             f"{(rows // 2, *y.shape[1:-1])}")
        if self._impl is None:
            self._impl = self._resolve(y, first)
            self._fast = _compiled_tap(self._impl, self.mask)
        if (self._fast is not None and type(y) is torch.Tensor and not torch.compiler.is_compiling()
                and not Backend.uses_reference(y)):
            z, coef = self._fast.penalty_tap(y, self.mask, first, keep, self.detach_clean)  # no Python either way
        else:
            z, coef = _PenaltyTap.apply(y, self.mask, first, keep, self.detach_clean, self._impl)
            self._python_taps = True
        if record:
            self.ys.append(y[first:].detach())
            self._coefs.append(coef)
        return z

    def _resolve(self, y: torch.Tensor, first: int) -> Backend:
        # ``auto`` by measurement, as for the ops: the stream's kernels (its value and one layer's tap
        # backward) timed on the first tapped layer, once per input class (dispatch.resolve_for)
        if self.backend != "auto" or Backend.uses_reference(y):
            return resolve_backend(self.backend, y.device)
        pair = y[first:].detach()
        mask, detach = self.mask, self.detach_clean

        def run(be):
            value, _count = be.penalty_value([pair], mask, weights_tensor(None, 1, pair.device))
            return be.penalty_tap_backward(None, value, pair, 0, mask, detach)

        key = dispatch.input_class("stream", y.dtype, y.shape[-1], y.numel(), mask is not None)
        return dispatch.resolve_for("penalty_stream", key, y.device, run)

    def loss(self, weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
        if not self.ys:
            raise ValueError("PenaltyStream.loss: no layer was tapped")
        w = weights_tensor(weights, len(self.ys), self.ys[0].device)
        value, count = self._impl.penalty_value(self.ys, self.mask, w)
        if self._fast is not None and not self._python_taps and not torch.compiler.is_compiling():
            out = self._fast.penalty_stream_loss(value, count, w, self._coefs)  # the same, one C++ node
        else:
            # value + sum_j (w_j / N) * 0: the value of the penalty, the gradient of each tap's scalar
            scale = w / count.to(w.device).clamp_min(1.0)
            out = value + (scale * torch.stack(self._coefs)).sum()
        self.ys, self._coefs, self._python_taps = [], [], False  # released: the taps keep what their backward needs
        return out
