"""The ``torch`` backend: the reference (``lnsr.ops.reference``) as a backend, on every device.

The ground truth every other backend is tested against, and what ``auto`` falls back to (its
preference, 0, is the lowest of the built-in ones).  Plain torch code: autograd does the backward.
"""
from __future__ import annotations

import torch

from .. import reference
from ..backend import Backend, _reference_loss_count, unsigned_seed
from .registry import register_backend


class TorchBackend(Backend):
    """The torch reference (``lnsr.ops.reference``) as a backend: every device, plain autograd."""

    name = "torch"

    def supports(self, device) -> bool:
        return True

    def noise_kernel(self, numel, seed, device):
        return reference.noise(numel, unsigned_seed(seed), device=device)

    def perturb_forward(self, h, seed, sigma, kind):
        return reference.perturb(h, unsigned_seed(seed), sigma=sigma, kind=kind)

    def perturb_forward_seeded(self, h, seed, sigma, kind):
        return reference.perturb(h, seed, sigma=sigma, kind=kind)  # Philox in tensor ops: no host read

    def perturb_backward(self, grad):
        b = grad.shape[0] // 2
        acc = torch.promote_types(grad.dtype, torch.float32)
        return (grad[:b].to(acc) + grad[b:].to(acc)).to(grad.dtype)

    def penalty_forward(self, ys, mask, weights, detach_clean):
        return _reference_loss_count(ys, mask, weights, detach_clean)

    def penalty_backward(self, grad, count, ys, mask, weights, detach_clean):
        ys = [y.detach().requires_grad_() for y in ys]
        with torch.enable_grad():
            loss = reference.layer_penalty(ys, mask=mask, weights=weights, detach_clean=detach_clean)
        return list(torch.autograd.grad(loss, ys, grad))


register_backend("torch", TorchBackend, auto={"cpu": 0, "cuda": 0})
