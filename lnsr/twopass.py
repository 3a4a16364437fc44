"""The LNSR penalty by its definition: two separate passes (docs/design.md §1).

A clean pass, then a noisy pass restarted at block ``k`` from the clean pass's ``h_k + eps``, and
the masked mean squared distance of the paired block outputs.  This is the obvious eager
implementation a user would write; the tests use it as the definition that the one-forward hooks
of ``lnsr.LNSR`` must reproduce, and the benchmarks as the baseline to beat.  So that it checks the
noise and the penalty maths too, not only the hooks, it uses none of the ops under test: the noise
comes from the shared stream ``lnsr.ops.noise`` and is shaped here, the penalty is plain torch.
"""
from __future__ import annotations

import math
from collections import defaultdict, deque

import torch
from torch import nn

from . import ops
from .config import LNSRConfig
from .models import block_batch_arg, find_blocks, replace_block_input, unwrap

_DEFAULTS = LNSRConfig()  # the options' defaults come from the one schema
# Without a config the definition is a plain two-pass loop: each pass draws its own dropout.
_DEFINITION = {"dropout": "independent"}


def _first_tensor(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def definition_eps(h: torch.Tensor, seed: int, *, sigma: float, noise: str = _DEFAULTS.noise,
                   mask: torch.Tensor | None = None, n_anchors: int = _DEFAULTS.n_anchors) -> torch.Tensor:
    """The noise ``eps`` (fp32, shape of ``h`` ``[B, ..., H]``) of each kind, from ``lnsr.ops.noise``.

    gaussian: ``sigma * z``; relative: ``sigma * rms(h_t) * z`` per token; manifold: ``sigma /
    sqrt(a) * c @ (A - mean(A))`` with ``A`` the ``a = min(n_anchors, valid tokens)`` anchor tokens
    (drawn without replacement by a CPU generator seeded with the seed's low 63 bits, in token
    order) and ``c`` ``[tokens, a]`` from the stream.
    """
    h = h.detach().float()
    shape, width = h.shape, h.shape[-1]
    if noise == "gaussian":
        return sigma * ops.noise(h.numel(), seed, device=h.device).view(shape)
    if noise == "relative":
        rms = (h ** 2).mean(-1, keepdim=True).sqrt()
        return sigma * rms * ops.noise(h.numel(), seed, device=h.device).view(shape)
    if noise != "manifold":
        raise ValueError(f"unknown noise {noise!r}")
    tokens = h.reshape(-1, width)
    valid = torch.arange(tokens.shape[0]) if mask is None else torch.nonzero(mask.reshape(-1).cpu() != 0)[:, 0]
    gen = torch.Generator().manual_seed(seed & (2**63 - 1))
    anchors = valid[torch.randperm(len(valid), generator=gen)[:n_anchors]].sort().values.to(h.device)
    a = len(anchors)
    if a == 0:
        return torch.zeros_like(h)
    centred = tokens[anchors] - tokens[anchors].mean(0)
    coef = ops.noise(tokens.shape[0] * a, seed, device=h.device).view(-1, a)
    return (sigma / math.sqrt(a) * (coef @ centred)).view(shape)


class _Dropouts:
    """Dropout in blocks >= k for the two passes.  ``paired``: each ``nn.Dropout`` module records
    its masks in the clean pass and replays them, in call order, in the noisy pass (shared by
    construction); probabilities that attention code reads itself (``.p``, float ``*dropout*``
    attributes) read 0.  ``off``: every one reads 0.  ``independent``: untouched."""

    def __init__(self, blocks, mode):
        self.mode, self.phase = mode, "clean"
        self.masks = defaultdict(deque)
        mods = list(dict.fromkeys(m for b in blocks for m in b.modules()))
        self.modules = [m for m in mods if isinstance(m, nn.Dropout)]
        self.floats = [(m, n) for m in mods for n, v in vars(m).items() if "dropout" in n.lower()
                       and isinstance(v, float)]
        self.saved = []

    def __enter__(self):
        if self.mode == "independent":
            return self
        self.saved = [(m, "p", m.p) for m in self.modules] + [(m, n, getattr(m, n)) for m, n in self.floats]
        for m in self.modules:
            if self.mode == "paired":
                m.forward = self._shared(m, m.p)
            m.p = 0.0
        for m, n in self.floats:
            setattr(m, n, 0.0)
        return self

    def __exit__(self, *exc):
        for m, name, value in self.saved:
            setattr(m, name, value)
        for m in self.modules:
            m.__dict__.pop("forward", None)

    def _shared(self, mod, p):
        def forward(x):
            if not mod.training or p == 0:
                return x
            if self.phase == "clean":
                keep = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
                self.masks[mod].append(keep)
            else:
                keep = self.masks[mod].popleft()
            return x * keep
        return forward


def two_pass(model: nn.Module, inputs: dict, config: LNSRConfig | None = None, *, seed: int, **options):
    """``(clean_output, penalty)``: the clean pass's model output and ``P`` (unscaled by lam).

    Options as ``lnsr.LNSR``'s (an ``lnsr.LNSRConfig`` and/or keywords, resolved by
    ``LNSRConfig.make``): ``sigma``, ``noise``, ``inject_at``, ``layer_weights``,
    ``detach_clean``, ``n_anchors``, ``blocks`` and ``dropout`` shape the penalty; ``lam``,
    ``backend``, ``every``, ``rank``, ``check_finite`` and ``add_to_loss`` do not enter it; the
    definition is the ``token`` normalisation over the whole batch (other ``normalize`` or
    ``noisy_fraction`` raise).  Without a config, ``dropout`` defaults to ``independent``.

    ``inputs`` are the model's keyword arguments; ``attention_mask`` (2-D) masks the penalty.
    Blocks below ``k`` run twice, as a two-pass implementation does; the noisy pass restarts at
    block ``k`` from the clean pass's input there (so dropout below ``k`` is the clean pass's).
    ``dropout``: what dropout does in blocks ``>= k`` (``independent``: each pass draws its own,
    ``paired``, ``off``), as ``lnsr.LNSR``'s option of the same name.  Call it on a model without
    gradient checkpointing: its hooks are gone by the time a backward would recompute the blocks.
    """
    cfg = LNSRConfig.make(_DEFINITION if config is None else config, **options)
    if cfg.normalize != "token" or cfg.noisy_fraction != 1.0:
        raise ValueError(f"two_pass is the definition with normalize='token' over the whole batch; got "
                         f"normalize={cfg.normalize!r}, noisy_fraction={cfg.noisy_fraction}: compare those against "
                         f"their formulas from the per-layer penalties (layer_weights)")
    sigma, noise, detach_clean, dropout = cfg.sigma, cfg.noise, cfg.detach_clean, cfg.dropout
    _, inner = unwrap(model)
    block_list, _ = find_blocks(inner, cfg.blocks)
    k, layer_weights = cfg.resolve(len(block_list))
    mask = inputs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    record: dict[str, list] = {"clean": [], "noisy": []}
    drop = _Dropouts(block_list[k:], dropout)
    entering = {}  # the clean pass's input of block k

    def pre_k(module, args, kwargs):
        if drop.phase == "clean":
            entering["h"] = block_batch_arg(args, kwargs)[0]
            return None
        h = entering["h"]
        noisy = (h.float() + definition_eps(h, seed, sigma=sigma, noise=noise, mask=mask,
                                            n_anchors=cfg.n_anchors)).to(h.dtype)
        return replace_block_input(args, kwargs, lambda _: noisy, who=f"block {k}")

    def post(module, args, output):
        record[drop.phase].append(_first_tensor(output))

    handles = [block_list[k].register_forward_pre_hook(pre_k, with_kwargs=True)]
    handles += [b.register_forward_hook(post) for b in block_list[k:]]
    try:
        with drop:
            clean_out = model(**inputs)
            drop.phase = "noisy"
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    # The definition, in plain torch: per layer, the masked mean over tokens of ||noisy - clean||^2.
    m = None if mask is None else mask.float()
    penalty = torch.zeros((), dtype=torch.float32, device=record["clean"][0].device)
    for j, (a, b) in enumerate(zip(record["clean"], record["noisy"])):
        if detach_clean:
            a = a.detach()
        d = ((b.float() - a.float()) ** 2).sum(-1)
        term = d.mean() if m is None else (d * m).sum() / m.sum().clamp_min(1.0)
        penalty = penalty + layer_weights[j] * term
    return clean_out, penalty
