"""The backend contract (docs/design.md §5): what a backend implements, and what all share.

A backend implements five kernels with the semantics of ``lnsr.ops.reference``:

- ``noise_kernel(numel, seed, device)``: ``z[0:numel]`` of the noise stream, fp32;
- ``perturb_forward(h, seed, sigma, kind)`` / ``perturb_backward(grad)``: dense ``gaussian`` and
  ``relative`` noise, ``cat([h, h + eps])``, and its gradient ``g[:B] + g[B:]``;
- ``penalty_forward(ys, mask, weights, detach_clean)`` -> ``(loss, count)`` /
  ``penalty_backward(grad, count, ys, mask, weights, detach_clean)``: the multi-layer penalty
  and the gradients of every ``y``;

plus ``supports(device)``; and, optionally (the base class has defaults), ``perturb_forward_seeded``
(perturb with a device seed read by the kernel, for CUDA-graph capture; the default reads it on the
host), ``penalty_value`` and ``penalty_tap_backward`` (the streaming penalty).
``perturb_forward`` and ``penalty_forward`` must be differentiable,
with ``perturb_backward`` / ``penalty_backward`` as their gradients (the contract test checks
this).  Seeds reach the kernels as int64 bit patterns (``seed_bits``), weights as an fp32 tensor
with one entry per layer (``weights_tensor``): the schema of the compiled ops (``OP_SCHEMAS``).

The base class owns, once for every backend, the public methods ``noise``, ``perturb`` and
``layer_penalty``: the fallback rule (``uses_reference``), the seed conversion, the weights and
the ``manifold`` kind, built on the backend's own ``noise``.

Backends, one module each in ``lnsr/ops/backends/`` (its registry, ``lnsr.ops.backends``, is what
``lnsr.ops.dispatch`` selects from): ``TorchBackend`` (the reference, ``backends/torch.py``; still
importable from here), ``lnsr.kernels.TritonBackend`` (Triton, registered by ``backends/triton.py``)
and ``ExtensionBackend`` (``lnsr._C``, ``backends/extension.py``); the two compiled ones are
``OpsBackend``s: torch.library ops of one schema, with fake implementations and autograd registered here.
"""
from __future__ import annotations

import abc
import collections
import math
from typing import Sequence

import torch

from . import reference

# float64 has no compiled kernel (it exists for gradcheck): the reference computes it.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Kinds a backend implements as a dense kernel; ``manifold`` is composed here from ``noise``.
DENSE_KINDS = ("gaussian", "relative")

# The schema of the compiled ops, one for every namespace (``lnsr`` for lnsr._C in
# csrc/binding.cpp, ``lnsr_triton`` for the Triton kernels).  ``count`` is the fp32 scalar N (the
# mask's sum, or the token count): the backward divides by max(N, 1).  ``weights`` is an fp32
# tensor so that new weights (``gain`` normalisation) do not recompile a compiled graph.
OP_SCHEMAS = {
    "noise": "(int numel, int seed, Device device) -> Tensor",
    "perturb": "(Tensor h, int seed, float sigma, str kind) -> Tensor",
    "perturb_backward": "(Tensor grad) -> Tensor",
    # perturb with a device seed (reference.is_device_seed): the kernel reads the seed from memory,
    # so a captured CUDA graph draws new noise on each replay once the tensor is refilled.
    "perturb_seeded": "(Tensor h, Tensor seed, float sigma, str kind) -> Tensor",
    "layer_penalty": "(Tensor[] ys, Tensor? mask, Tensor weights, bool detach_clean) -> (Tensor, Tensor)",
    "layer_penalty_backward": "(Tensor grad, Tensor count, Tensor[] ys, Tensor? mask, Tensor weights, "
                              "bool detach_clean) -> Tensor[]",
    # the streaming penalty's gradient of one layer (reference.penalty_tap_backward), one fused pass
    "penalty_tap_backward": "(Tensor? grad, Tensor coef, Tensor y, int first, Tensor? mask, bool detach_clean) "
                            "-> Tensor",
}


def seed_bits(seed) -> int:
    """The checked seed in [0, 2**64) as the int64 with the same 64 bits (the schema's ``int``)."""
    seed = reference.check_seed(seed)
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def unsigned_seed(bits: int) -> int:
    """Inverse of ``seed_bits``."""
    return bits + (1 << 64) if bits < 0 else bits


# Weights given as floats, as device tensors, per (device, values): LNSR passes the same constant
# weights every step, and a cached tensor costs no host-to-device copy (which a CUDA graph capture
# forbids).  Bounded: normalize="gain" gives new values every step.
_WEIGHTS: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()
_WEIGHTS_MAX = 64


def _cached_weights(key: tuple, make) -> torch.Tensor:
    """``_WEIGHTS[key]``, made by ``make()`` on a miss; least recently used entries go first."""
    w = _WEIGHTS.get(key)
    if w is None:
        w = _WEIGHTS[key] = make()
        if len(_WEIGHTS) > _WEIGHTS_MAX:
            _WEIGHTS.popitem(last=False)
    else:
        _WEIGHTS.move_to_end(key)
    return w


def weights_tensor(weights, n: int, device) -> torch.Tensor:
    """Layer weights (None = all 1, a sequence of floats, or a tensor) as an fp32 [n] tensor on device."""
    if weights is None and not torch.compiler.is_compiling():  # the common case: keyed by n, one lookup
        device = torch.device(device)
        return _cached_weights((device.type, device.index, n),
                               lambda: torch.ones(n, dtype=torch.float32, device=device))
    if weights is None:
        weights = (1.0,) * n
    if isinstance(weights, torch.Tensor):
        w = weights.detach().to(device=device, dtype=torch.float32).reshape(-1)
    elif torch.compiler.is_compiling():  # a constant of the graph; a global cache would be guarded on
        w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device=device)
    else:
        values = tuple(float(x) for x in weights)
        device = torch.device(device)
        w = _cached_weights((device.type, device.index, values),
                            lambda: torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True))
    if w.numel() != n:
        raise ValueError(f"weights has {w.numel()} entries for {n} tensors in ys")
    return w


def _reference_loss_count(ys, mask, weights, detach_clean):
    """``(loss, count)`` by the reference: the torch backend's forward and every fallback's."""
    loss = reference.layer_penalty(ys, mask=mask, weights=weights, detach_clean=detach_clean)
    rows = math.prod(ys[0].shape[:-1]) // 2
    count = (mask.to(torch.float32).sum() if mask is not None
             else torch.full((), float(rows), dtype=torch.float32, device=ys[0].device))
    return loss, count


class Backend(abc.ABC):
    """One backend of the lnsr ops: implement the abstract methods, inherit the rest."""

    name: str = "?"

    # -- what a backend implements -------------------------------------------------------------

    @abc.abstractmethod
    def supports(self, device: torch.device) -> bool:
        """Whether the kernels run on tensors of ``device``."""

    @abc.abstractmethod
    def noise_kernel(self, numel: int, seed: int, device: torch.device) -> torch.Tensor:
        """``z[0:numel]`` of the stream of ``seed`` (int64 bits), fp32 on ``device``."""

    @abc.abstractmethod
    def perturb_forward(self, h: torch.Tensor, seed: int, sigma: float, kind: str) -> torch.Tensor:
        """``cat([h, h + eps])`` for a dense ``kind``; ``h`` is non-empty, of a kernel dtype."""

    def perturb_forward_seeded(self, h: torch.Tensor, seed: torch.Tensor, sigma: float, kind: str) -> torch.Tensor:
        """``perturb_forward`` with a device seed (``reference.is_device_seed``, on ``h``'s device).
        The compiled backends read it in the kernel; this default reads it on the host (correct, but
        a host sync, so not CUDA-graph safe): a new backend should override it."""
        return self.perturb_forward(h, int(seed.item()), sigma, kind)

    @abc.abstractmethod
    def perturb_backward(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad[:B] + grad[B:]``, in the dtype of ``grad``."""

    @abc.abstractmethod
    def penalty_forward(self, ys: list[torch.Tensor], mask: torch.Tensor | None, weights: torch.Tensor,
                        detach_clean: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, count)``: the fp32 scalar penalty and the fp32 scalar N (not differentiable)."""

    @abc.abstractmethod
    def penalty_backward(self, grad: torch.Tensor, count: torch.Tensor, ys: list[torch.Tensor],
                         mask: torch.Tensor | None, weights: torch.Tensor, detach_clean: bool) -> list[torch.Tensor]:
        """The gradient of each ``y`` for the penalty's gradient ``grad``."""

    # -- shared by every backend ----------------------------------------------------------------

    @staticmethod
    def uses_reference(*tensors: torch.Tensor) -> bool:
        """The fallback rule: empty tensors and dtypes without a kernel (float64) take the reference."""
        for t in tensors:  # a plain loop: this runs on every op call
            if t.dtype not in KERNEL_DTYPES or t.numel() == 0:
                return True
        return False

    def noise(self, numel: int, seed: int, *, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``z[0:numel]`` of the noise stream (computed in fp32, returned as ``dtype``; CPU by default)."""
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise ValueError(f"numel must be a non-negative int, got {numel!r}")
        device = torch.device("cpu" if device is None else device)
        return self.noise_kernel(numel, seed_bits(seed), device).to(dtype)

    def perturb(self, h: torch.Tensor, seed: int, *, sigma: float, kind: str = "relative",
                mask: torch.Tensor | None = None, n_anchors: int = reference.DEFAULT_ANCHORS) -> torch.Tensor:
        """``cat([h, h + eps])`` with ``lnsr.ops.perturb``'s semantics (inputs already validated)."""
        if self.uses_reference(h):
            return reference.perturb(h, seed, sigma=sigma, kind=kind, mask=mask, n_anchors=n_anchors)
        if kind in DENSE_KINDS:
            return self.perturb_forward(h, seed_bits(seed), float(sigma), kind)
        if kind == "manifold":
            eps = reference.manifold_eps(h, reference.check_seed(seed), sigma=float(sigma), mask=mask,
                                         n_anchors=n_anchors, noise_fn=self.noise)
            return reference.add_noise(h, eps)  # plain autograd through the add: g[:B] + g[B:]
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {', '.join(reference.NOISE_KINDS)}")

    def perturb_seeded(self, h: torch.Tensor, seed: torch.Tensor, *, sigma: float, kind: str = "relative",
                       mask: torch.Tensor | None = None, n_anchors: int = reference.DEFAULT_ANCHORS) -> torch.Tensor:
        """``perturb`` with a device seed on ``h``'s device: the same values as ``perturb(h,
        unsigned_seed(seed))``, without reading the seed on the host (except for ``manifold``, whose
        anchors are drawn there)."""
        if self.uses_reference(h):
            return reference.perturb(h, seed, sigma=sigma, kind=kind, mask=mask, n_anchors=n_anchors)
        if kind in DENSE_KINDS:
            return self.perturb_forward_seeded(h, seed, float(sigma), kind)
        return self.perturb(h, unsigned_seed(int(seed.item())), sigma=sigma, kind=kind, mask=mask,
                            n_anchors=n_anchors)

    def layer_penalty(self, ys: Sequence[torch.Tensor], *, mask: torch.Tensor | None = None,
                      weights: Sequence[float] | torch.Tensor | None = None,
                      detach_clean: bool = False) -> torch.Tensor:
        """``lnsr.ops.layer_penalty``'s fp32 scalar (inputs already validated)."""
        ys = [ys] if isinstance(ys, torch.Tensor) else list(ys)
        n_w = None if weights is None else weights.numel() if isinstance(weights, torch.Tensor) else len(weights)
        if n_w is not None and n_w != len(ys):  # before the fallback: one rule whichever path computes
            raise ValueError(f"weights has {n_w} entries for {len(ys)} tensors in ys")
        if self.uses_reference(*ys):
            return reference.layer_penalty(ys, mask=mask, weights=weights, detach_clean=detach_clean)
        w = weights_tensor(weights, len(ys), ys[0].device)
        loss, _count = self.penalty_forward(ys, mask, w, bool(detach_clean))
        return loss

    # -- the streaming penalty (docs/design.md §4): the value once, each layer's gradient in its backward

    def penalty_value(self, ys: Sequence[torch.Tensor], mask: torch.Tensor | None,
                      weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, count)`` of ``layer_penalty`` as detached fp32 scalars (no graph is recorded)."""
        with torch.no_grad():
            if self.uses_reference(*ys):
                return _reference_loss_count(ys, mask, weights, False)
            return self.penalty_forward(list(ys), mask, weights, False)

    def penalty_tap_backward(self, grad: torch.Tensor | None, coef: torch.Tensor, y: torch.Tensor, first: int,
                             mask: torch.Tensor | None, detach_clean: bool) -> torch.Tensor:
        """One layer's gradient under the streaming penalty (``reference.penalty_tap_backward``).
        A backend may override it with a fused kernel; the default is the reference."""
        return reference.penalty_tap_backward(grad, coef, y, first, mask, detach_clean)

    def __repr__(self) -> str:
        return f"<lnsr backend {self.name!r} ({type(self).__name__})>"


class OpsBackend(Backend):
    """A backend whose kernels are the torch.library ops ``<namespace>::<op>`` of ``OP_SCHEMAS``.

    The ops carry their autograd and fake implementations (``register_op_extras``), so that
    ``torch.compile`` traces them as opaque nodes and ``opcheck`` can test them.
    """

    namespace: str = "?"

    @property
    def ops(self):
        return getattr(torch.ops, self.namespace)

    def noise_kernel(self, numel, seed, device):
        return self.ops.noise(int(numel), int(seed), device)

    def perturb_forward(self, h, seed, sigma, kind):
        return self.ops.perturb(h, int(seed), float(sigma), kind)

    def perturb_forward_seeded(self, h, seed, sigma, kind):
        return self.ops.perturb_seeded(h, seed, float(sigma), kind)

    def perturb_backward(self, grad):
        return self.ops.perturb_backward(grad)

    def penalty_forward(self, ys, mask, weights, detach_clean):
        loss, count = self.ops.layer_penalty(ys, mask, weights, bool(detach_clean))
        return loss, count

    def penalty_backward(self, grad, count, ys, mask, weights, detach_clean):
        return list(self.ops.layer_penalty_backward(grad, count, ys, mask, weights, bool(detach_clean)))

    def penalty_tap_backward(self, grad, coef, y, first, mask, detach_clean):
        # one fused pass over y (and grad) instead of the reference's several
        if self.uses_reference(y):
            return super().penalty_tap_backward(grad, coef, y, first, mask, detach_clean)
        return self.ops.penalty_tap_backward(grad, coef, y, int(first), mask, bool(detach_clean))


_REGISTERED: set[str] = set()


def register_op_extras(namespace: str, *, autograd: bool = True) -> None:
    """Fake implementations and (``autograd=True``) autograd of the ``OP_SCHEMAS`` ops of
    ``namespace``, written once for both compiled backends.  lnsr._C registers its autograd in
    C++ (csrc/binding.cpp) and passes ``autograd=False``.  Call after the ops are defined; later
    calls do nothing."""
    if namespace in _REGISTERED:
        return
    _REGISTERED.add(namespace)
    q = f"{namespace}::".__add__
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(q("noise"))
    def _noise_fake(numel, seed, device):
        return torch.empty((numel,), dtype=torch.float32, device=device)

    @torch.library.register_fake(q("perturb"))
    def _perturb_fake(h, seed, sigma, kind):
        return h.new_empty((2 * h.shape[0], *h.shape[1:]))

    @torch.library.register_fake(q("perturb_seeded"))
    def _perturb_seeded_fake(h, seed, sigma, kind):
        return h.new_empty((2 * h.shape[0], *h.shape[1:]))

    @torch.library.register_fake(q("perturb_backward"))
    def _perturb_backward_fake(grad):
        return grad.new_empty((grad.shape[0] // 2, *grad.shape[1:]))

    @torch.library.register_fake(q("layer_penalty"))
    def _layer_penalty_fake(ys, mask, weights, detach_clean):
        return ys[0].new_empty((), dtype=torch.float32), ys[0].new_empty((), dtype=torch.float32)

    @torch.library.register_fake(q("layer_penalty_backward"))
    def _layer_penalty_backward_fake(grad, count, ys, mask, weights, detach_clean):
        return [torch.empty_like(y, memory_format=torch.contiguous_format) for y in ys]

    @torch.library.register_fake(q("penalty_tap_backward"))
    def _penalty_tap_backward_fake(grad, coef, y, first, mask, detach_clean):
        return torch.empty_like(y, memory_format=torch.contiguous_format)

    if not autograd:
        return

    def perturb_setup(ctx, inputs, output):
        pass  # the backward needs nothing saved: g[:B] + g[B:]

    def perturb_bwd(ctx, grad):
        return ops.perturb_backward(grad), None, None, None

    torch.library.register_autograd(q("perturb"), perturb_bwd, setup_context=perturb_setup)
    torch.library.register_autograd(q("perturb_seeded"), perturb_bwd, setup_context=perturb_setup)

    def penalty_setup(ctx, inputs, output):
        ys, mask, weights, detach_clean = inputs
        count = output[1]
        ctx.n_ys, ctx.has_mask, ctx.detach_clean = len(ys), mask is not None, bool(detach_clean)
        # Only the inputs (alive anyway: the model keeps them for its own backward) and two tiny
        # tensors; no activation of the penalty is stored.
        ctx.save_for_backward(count, weights, mask if mask is not None else count, *ys)
        ctx.mark_non_differentiable(count)

    def penalty_bwd(ctx, grad_loss, _grad_count):
        count, weights, mask, *ys = ctx.saved_tensors
        grads = ops.layer_penalty_backward(grad_loss, count, ys, mask if ctx.has_mask else None, weights,
                                           ctx.detach_clean)
        return list(grads), None, None, None

    torch.library.register_autograd(q("layer_penalty"), penalty_bwd, setup_context=penalty_setup)


def __getattr__(name):
    # TorchBackend is in lnsr/ops/backends/torch.py (one file per backend, issue #34); still importable from here
    if name == "TorchBackend":
        from .backends.torch import TorchBackend

        return TorchBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
