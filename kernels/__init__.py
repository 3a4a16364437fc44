"""Triton kernels of the lnsr ops, installed as ``lnsr.kernels`` (DESIGN §4, issue 3).

``backend()`` is what ``lnsr.ops.dispatch`` loads for ``backend="triton"``.  Triton is imported
only there, so that importing ``lnsr.kernels`` never fails on a machine without it.  The kernels
run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before the first
``backend()`` call (Triton picks the interpreter when a kernel is defined).
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Sequence

import torch

__all__ = ["backend"]


def _supports(impl_module):
    def supports(device) -> bool:
        device = torch.device(device)
        if device.type == "cuda":
            return True  # compiled kernels (or, under TRITON_INTERPRET=1, the interpreter copying to host)
        if device.type == "cpu":
            # Kernels defined under the interpreter run on CPU tensors, and only those.
            return impl_module.INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1"
        return False

    return supports


def backend():
    """The ``triton`` backend object; ImportError when Triton is missing or unusable."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        raise ImportError(f"triton is not importable ({type(exc).__name__}: {exc})") from exc
    from . import _triton as impl
    from lnsr.ops import reference

    def perturb(h: torch.Tensor, seed: int, *, sigma: float, kind: str = "relative",
                mask: torch.Tensor | None = None, n_anchors: int = reference.DEFAULT_ANCHORS) -> torch.Tensor:
        seed = reference.check_seed(seed)
        if h.numel() == 0 or h.dtype == torch.float64:
            # fp64 is for gradcheck, where the reference accumulates in fp64: take the reference.
            return reference.perturb(h, seed, sigma=sigma, kind=kind, mask=mask, n_anchors=n_anchors)
        return impl.perturb_op(h, impl._signed64(seed), float(sigma), kind, mask, int(n_anchors))

    def layer_penalty(ys: Sequence[torch.Tensor], *, mask: torch.Tensor | None = None,
                      weights=None, detach_clean: bool = False) -> torch.Tensor:
        ys = [ys] if isinstance(ys, torch.Tensor) else list(ys)
        tokens = ys[0].shape[:-1]
        if ys[0].numel() == 0 or any(y.shape[:-1] != tokens or y.device != ys[0].device
                                     or y.dtype == torch.float64 for y in ys):
            # Empty, layers without shared token dims (the kernel's geometry assumes them), or fp64
            # (gradcheck, accumulated in fp64 by the reference): the reference.
            return reference.layer_penalty(ys, mask=mask, weights=weights, detach_clean=detach_clean)
        if weights is None:
            w = torch.ones(len(ys), dtype=torch.float32)
        elif isinstance(weights, torch.Tensor):
            w = weights.detach().to(torch.float32).reshape(-1)
        else:
            w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
        w = w.to(ys[0].device, non_blocking=True)
        loss, _ = impl.layer_penalty_op(ys, None if mask is None else mask.detach(), w, bool(detach_clean))
        return loss

    return SimpleNamespace(name="triton", perturb=perturb, layer_penalty=layer_penalty,
                           supports=_supports(impl), noise=impl.noise)
