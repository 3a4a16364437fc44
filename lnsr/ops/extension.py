"""The ``cpu`` and ``cuda`` backends: the compiled kernels of ``lnsr._C`` (``csrc/``).

Importing ``lnsr._C`` registers the ops ``torch.ops.lnsr.{noise, perturb, perturb_backward,
layer_penalty, layer_penalty_backward}`` (C++ ``TORCH_LIBRARY``, CPU and CUDA kernels).  This module
adds what is easier in Python: autograd (``torch.library.register_autograd``) and the fake
implementations (``torch.library.register_fake``) that ``torch.compile`` and ``opcheck`` need.

``backend(kind)`` raises ImportError when the extension is not built, fails to load, or (for
``kind='cuda'``) was built without CUDA kernels; ``lnsr.ops.dispatch`` then falls back and keeps the
reason.  A build that exists but does not load (e.g. compiled against another torch) also warns once.
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from typing import Sequence

import torch

from . import reference

_C = None
_LOAD_ERROR: str | None = None

# float64 has no compiled kernel: the backends hand it to the reference (same semantics).
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _as_int64(seed: int) -> int:
    """The schema's ``int`` is int64: pass seeds in [2**63, 2**64) as their two's-complement bits."""
    seed = reference.check_seed(seed)
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def _is_built() -> bool:
    try:
        return importlib.util.find_spec("lnsr._C") is not None
    except (ImportError, ValueError):
        return False


def load_error() -> str | None:
    """Why lnsr._C could not be used (None when it loaded or was never tried)."""
    return _LOAD_ERROR


def load():
    """Import ``lnsr._C`` once and register the Python parts of the ops; ImportError if impossible."""
    global _C, _LOAD_ERROR
    if _C is not None:
        return _C
    if _LOAD_ERROR is not None:
        raise ImportError(_LOAD_ERROR)
    if not _is_built():
        _LOAD_ERROR = ("lnsr._C is not built (install with `pip install --no-build-isolation -e .`; "
                       "LNSR_NO_EXT=1 skips it)")
        raise ImportError(_LOAD_ERROR)
    try:
        from .. import _C as mod
    except (ImportError, OSError) as exc:
        # Built but unusable (typically compiled against a different torch): say so once, loudly.
        _LOAD_ERROR = f"lnsr._C is built but failed to load: {type(exc).__name__}: {exc}"
        warnings.warn(f"{_LOAD_ERROR}; lnsr falls back to the Triton/torch backends. Rebuild with "
                      "`pip install --no-build-isolation -e .`", RuntimeWarning, stacklevel=3)
        raise ImportError(_LOAD_ERROR) from exc
    _register_python_parts()
    _C = mod
    return mod


def with_cuda() -> bool:
    """Whether ``lnsr._C`` was compiled with its CUDA kernels (False when it is not importable)."""
    try:
        return bool(load().WITH_CUDA)
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------------
# torch.library: fake implementations and autograd
# ---------------------------------------------------------------------------------------------

def _register_python_parts() -> None:
    lib = "lnsr::"

    @torch.library.register_fake(lib + "noise")
    def _noise_fake(numel, seed, device):
        return torch.empty((numel,), dtype=torch.float32, device=device)

    @torch.library.register_fake(lib + "perturb")
    def _perturb_fake(h, seed, sigma, kind):
        return h.new_empty((2 * h.shape[0], *h.shape[1:]))

    @torch.library.register_fake(lib + "perturb_backward")
    def _perturb_backward_fake(grad):
        return grad.new_empty((grad.shape[0] // 2, *grad.shape[1:]))

    @torch.library.register_fake(lib + "layer_penalty")
    def _layer_penalty_fake(ys, mask, weights, detach_clean):
        return (ys[0].new_empty((), dtype=torch.float32), ys[0].new_empty((), dtype=torch.float32))

    @torch.library.register_fake(lib + "layer_penalty_backward")
    def _layer_penalty_backward_fake(grad, count, ys, mask, weights, detach_clean):
        return [torch.empty_like(y, memory_format=torch.contiguous_format) for y in ys]

    def _perturb_setup(ctx, inputs, output):
        pass  # the backward needs nothing saved: g[:B] + g[B:]

    def _perturb_bwd(ctx, grad):
        return torch.ops.lnsr.perturb_backward(grad), None, None, None

    torch.library.register_autograd(lib + "perturb", _perturb_bwd, setup_context=_perturb_setup)

    def _penalty_setup(ctx, inputs, output):
        ys, mask, weights, detach_clean = inputs
        _, count = output
        # ys are alive anyway (the model keeps them for its own backward): nothing extra is stored.
        ctx.save_for_backward(count, *ys)
        ctx.mask = mask
        ctx.weights = list(weights)
        ctx.detach_clean = bool(detach_clean)
        ctx.mark_non_differentiable(count)

    def _penalty_bwd(ctx, grad_loss, grad_count):
        count, *ys = ctx.saved_tensors
        grads = torch.ops.lnsr.layer_penalty_backward(grad_loss, count, ys, ctx.mask, ctx.weights,
                                                      ctx.detach_clean)
        return list(grads), None, None, None

    torch.library.register_autograd(lib + "layer_penalty", _penalty_bwd, setup_context=_penalty_setup)


# ---------------------------------------------------------------------------------------------
# The backend objects (the interface of lnsr.ops.dispatch)
# ---------------------------------------------------------------------------------------------

class ExtensionBackend:
    """``perturb`` / ``layer_penalty`` with lnsr.ops.reference semantics on the compiled kernels."""

    def __init__(self, name: str):
        self.name = name
        self._device_type = name

    def supports(self, device) -> bool:
        device = torch.device(device)
        if device.type != self._device_type:
            return False
        return self._device_type == "cpu" or with_cuda()

    def __repr__(self) -> str:
        return f"<lnsr backend {self.name!r} (lnsr._C)>"

    def noise(self, numel: int, seed: int, *, device=None) -> torch.Tensor:
        """z[0:numel] of the noise stream (fp32), from the compiled kernel."""
        device = torch.device(device if device is not None else self._device_type)
        return torch.ops.lnsr.noise(int(numel), _as_int64(seed), device)

    def perturb(self, h: torch.Tensor, seed: int, *, sigma: float, kind: str = "relative",
                mask: torch.Tensor | None = None, n_anchors: int = reference.DEFAULT_ANCHORS) -> torch.Tensor:
        if h.dtype not in _KERNEL_DTYPES:
            return reference.perturb(h, seed, sigma=sigma, kind=kind, mask=mask, n_anchors=n_anchors)
        if kind in ("gaussian", "relative"):
            return torch.ops.lnsr.perturb(h, _as_int64(seed), float(sigma), kind)
        if kind == "manifold":
            return self._perturb_manifold(h, seed, sigma=sigma, mask=mask, n_anchors=n_anchors)
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {', '.join(reference.NOISE_KINDS)}")

    def _perturb_manifold(self, h, seed, *, sigma, mask, n_anchors):
        # Anchors are shared Python (reference.manifold_anchors); the coefficients come from the
        # compiled noise kernel; the rest is one GEMM, with plain autograd through the add.
        with torch.no_grad():
            hid = h.shape[-1]
            anchors = reference.manifold_anchors(mask, h.shape, seed, n_anchors, h.device)
            a = anchors.numel()
            if a == 0:  # no valid token: nothing to span, no noise
                eps = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
            else:
                rows = h.reshape(-1, hid).float()[anchors]
                centred = rows - rows.mean(dim=0, keepdim=True)
                coef = self.noise(math.prod(h.shape[:-1]) * a, seed, device=h.device).view(-1, a)
                eps = ((sigma / math.sqrt(a)) * (coef @ centred)).view(h.shape)
        return torch.cat([h, (h.float() + eps).to(h.dtype)], dim=0)

    def layer_penalty(self, ys: Sequence[torch.Tensor], *, mask: torch.Tensor | None = None,
                      weights: Sequence[float] | torch.Tensor | None = None,
                      detach_clean: bool = False) -> torch.Tensor:
        if isinstance(ys, torch.Tensor):
            ys = [ys]
        ys = list(ys)
        if any(y.dtype not in _KERNEL_DTYPES for y in ys):
            return reference.layer_penalty(ys, mask=mask, weights=weights, detach_clean=detach_clean)
        if weights is None:
            w = [1.0] * len(ys)
        elif isinstance(weights, torch.Tensor):
            w = [float(x) for x in weights.detach().cpu().tolist()]
        else:
            w = [float(x) for x in weights]
        loss, _ = torch.ops.lnsr.layer_penalty(ys, mask, w, bool(detach_clean))
        return loss


def backend(kind: str) -> ExtensionBackend:
    """The ``cpu`` or ``cuda`` backend; ImportError when lnsr._C (or its CUDA part) is missing."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"extension backends are 'cpu' and 'cuda', got {kind!r}")
    mod = load()
    if kind == "cuda" and not mod.WITH_CUDA:
        raise ImportError("lnsr._C was built without CUDA kernels (no CUDA toolkit at build time, or LNSR_NO_CUDA=1); rebuild "
                          "with `CUDA_HOME=/path/to/cuda pip install --no-build-isolation -e .`")
    return ExtensionBackend(kind)
