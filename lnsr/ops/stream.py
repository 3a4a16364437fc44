"""The streaming penalty (docs/design.md §4): ``PenaltyStream``, what ``LNSR`` uses inside a model.

``layer_penalty`` returns every layer's gradient at once when its backward starts: L full tensors
alive together, each then sliced and added into its block's gradient.  Here each block output
passes through a tap, an identity whose backward adds that layer's penalty gradient into the
gradient already flowing to the block, so one layer's penalty gradient is alive at a time.  The
penalty's value is computed once, without a graph; its gradient reaches tap j as the scalar
``dP * w_j / N`` through a zero scalar the tap returns beside the block output.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from . import dispatch
from .backend import Backend, weights_tensor
from .dispatch import resolve_backend

__all__ = ["PenaltyStream"]


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
