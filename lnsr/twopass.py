"""The LNSR penalty by its definition: two separate passes (DESIGN §1).

A clean pass, then a noisy pass restarted at block ``k`` from ``h_k + eps`` with the same noise
(the rows ``B:`` of ``perturb(h_k)``), and the penalty of the paired block outputs.  This is the
obvious eager implementation a user would write; the tests use it as the definition that the
one-forward hooks of ``lnsr.LNSR`` must reproduce, and the benchmarks as the baseline to beat.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .ops import reference
from .models import block_batch_arg, find_blocks, unwrap


def _first_tensor(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def two_pass(model: nn.Module, inputs: dict, *, seed: int, sigma: float = 0.05, noise: str = "relative",
             inject_at: int = 0, layer_weights=None, detach_clean: bool = False, n_anchors: int = 64,
             blocks=None, backend: str = "torch"):
    """``(clean_output, penalty)``: the clean pass's model output and ``P`` (unscaled by lam).

    ``inputs`` are the model's keyword arguments; ``attention_mask`` (2-D) masks the penalty.
    Blocks below ``k`` run twice, as a two-pass implementation does.
    """
    _, inner = unwrap(model)
    block_list, _ = find_blocks(inner, blocks)
    k = inject_at % len(block_list)
    mask = inputs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    record: dict[str, list] = {"clean": [], "noisy": []}
    phase = {"name": "clean", "h": None}

    def pre_k(module, args, kwargs):
        h, where = block_batch_arg(args, kwargs)
        if phase["name"] == "clean":
            phase["h"] = h
            return None
        noisy = ops.perturb(h, seed, sigma=sigma, kind=noise, mask=mask, n_anchors=n_anchors,
                            backend=backend)[h.shape[0]:]
        if where[0] == "args":
            return (noisy,) + tuple(args[1:]), kwargs
        return args, {**kwargs, where[1]: noisy}

    def post(module, args, output):
        record[phase["name"]].append(_first_tensor(output))

    handles = [block_list[k].register_forward_pre_hook(pre_k, with_kwargs=True)]
    handles += [b.register_forward_hook(post) for b in block_list[k:]]
    try:
        clean_out = model(**inputs)
        phase["name"] = "noisy"
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
    # The obvious implementation: a Python loop of masked squared errors over the layer pairs.
    penalty = reference.pair_penalty(record["clean"], record["noisy"], mask=mask, weights=layer_weights,
                                     detach_clean=detach_clean)
    return clean_out, penalty
