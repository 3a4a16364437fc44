"""What ``lnsr.LNSR``'s hooks read from a model's call and do to its blocks' calls (docs/design.md §3).

Reading: ``CallArgs`` finds an argument of the model's forward in a call's ``(args, kwargs)`` by
name, passed by keyword or by position (the forward's signature is inspected once, at attach).
Checking, every regularised step, only what depends on the inputs (the options were validated
once, by ``LNSRConfig``): ``check_model_call`` (no ``output_hidden_states``, no KV cache; it reads
the attention mask), ``check_block_call`` (no KV cache handed to a block), ``check_doubled`` (a
block above k gets the doubled batch), ``check_injected`` (the mask's shape, NaN/Inf where the
noise goes in).  Doubling: ``noisy_double`` turns block k's input into ``cat([h, h[B-m:] + eps])``,
``double_call`` every other batch-sized tensor of a block's call into ``cat([x, x[B-m:]])``
(cached per forward), and ``tap_block_output`` passes a block's doubled output through the
penalty's tap, handing on only the clean half after the last block.
"""
from __future__ import annotations

import inspect

import torch

from . import ops


class CallArgs:
    """Reads the arguments of calls of ``forward`` by name, from keywords or from their position."""

    def __init__(self, forward):
        try:
            params = inspect.signature(forward).parameters
        except (TypeError, ValueError):
            params = {}
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.positions = {n: i for i, n in enumerate(n for n, p in params.items() if p.kind in kinds)}

    def get(self, name, args, kwargs):
        """The argument ``name`` of the call ``(args, kwargs)``, or None when it was not passed."""
        if name in kwargs:
            return kwargs[name]
        i = self.positions.get(name)
        return args[i] if i is not None and i < len(args) else None

    def reader(self, args, kwargs):
        """``read(name)``: ``get(name, args, kwargs)`` of this one call."""
        return lambda name: self.get(name, args, kwargs)


def check_model_call(read, model) -> tuple[torch.Tensor | None, bool]:
    """The checks of a regularised training call of ``model`` whose arguments ``read(name)`` returns.

    Returns ``(mask, no_cache)``: the detached ``[B, T]`` attention mask (None when absent or not
    2-d) and whether ``use_cache=False`` must be passed (the model's config would build a cache)."""
    config = getattr(model, "config", None)
    ohs = read("output_hidden_states")
    if ohs or (ohs is None and getattr(config, "output_hidden_states", False)):
        raise ValueError("output_hidden_states=True is not supported during a regularised training forward "
                         "(blocks >= inject_at run on a doubled batch); call the model with "
                         "output_hidden_states=False, or in eval mode / under torch.no_grad()")
    use_cache = read("use_cache")
    if read("past_key_values") is not None or use_cache:
        raise ValueError("a KV cache (past_key_values / use_cache=True) cannot be used during a regularised "
                         "training forward; pass use_cache=False and no past_key_values when training")
    mask = read("attention_mask")
    mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    return mask, bool(use_cache is None and getattr(config, "use_cache", False))


def check_block_call(kwargs) -> None:
    """A block's call carries no KV cache (the model was called without one; a block may build one)."""
    for key, value in kwargs.items():
        if value is not None and type(value).__name__.endswith("Cache"):
            raise ValueError(f"block received a KV cache ({key}={type(value).__name__}) during a regularised "
                             f"training forward; pass use_cache=False when training")


def check_doubled(h: torch.Tensor, j: int, batch: int | None, noisy: int | None) -> torch.Tensor:
    """``h``, the input of block ``j`` above block k, once checked to hold the doubled batch of
    ``batch + noisy`` rows."""
    if batch is None or h.shape[0] != batch + noisy:
        raise RuntimeError(f"block {j} received a batch of {h.shape[0]} where the doubled batch of "
                           f"{None if batch is None else batch + noisy} was expected; are the "
                           f"blocks in execution order? pass blocks= bottom first")
    return h


def check_injected(h: torch.Tensor, mask: torch.Tensor | None, j: int, block, check_finite: bool) -> None:
    """The hidden state ``h`` entering block ``j``, where the noise goes in: its token dims match the
    attention mask, and (``check_finite``) it holds no NaN/Inf."""
    if mask is not None and tuple(mask.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but the hidden state entering block "
                         f"{j} has token dims {tuple(h.shape[:-1])}; pass a [batch, seq_len] mask that "
                         f"matches the inputs")
    # One reduction and a host sync; skipped while torch.compile traces (it would break the graph).
    if check_finite and not torch.compiler.is_compiling() and not bool(torch.isfinite(h).all()):
        raise ValueError(f"non-finite values (NaN/Inf) in the hidden state entering block {j} "
                         f"({type(block).__name__}), where LNSR injects noise; check the inputs, the "
                         f"learning rate or the loss scale")


def double(x, batch: int, noisy: int, cache: dict):
    """``cat([x, x[batch-noisy:]])`` for a batch-sized tensor ``x`` (``batch`` rows, 2-d or more),
    also inside tuples and lists; anything else as it is.  ``cache`` (``id(x) -> (x, doubled)``,
    one per forward) doubles a tensor that several blocks receive once."""
    if isinstance(x, torch.Tensor):
        if x.dim() >= 2 and x.shape[0] == batch:
            if torch.compiler.is_compiling():
                # No identity lookup in traced code: Dynamo guards on the tensor's id, which
                # changes every step, so each step would compile a new graph (issue #14).
                return torch.cat([x, x[batch - noisy:]], dim=0)
            hit = cache.get(id(x))
            if hit is None or hit[0] is not x:
                hit = (x, torch.cat([x, x[batch - noisy:]], dim=0))
                cache[id(x)] = hit
            return hit[1]
        return x
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(double(v, batch, noisy, cache) for v in x)
    if isinstance(x, list):
        return [double(v, batch, noisy, cache) for v in x]
    return x


def double_call(args, kwargs, batch: int, noisy: int, cache: dict):
    """``(args, kwargs)`` of a block's call with every batch-sized tensor doubled (``double``)."""
    return (tuple(double(a, batch, noisy, cache) for a in args),
            {key: double(v, batch, noisy, cache) for key, v in kwargs.items()})


def noisy_double(h: torch.Tensor, first: int, seed, config, mask: torch.Tensor | None) -> torch.Tensor:
    """Block k's input ``h`` ``[B, ...]`` -> ``cat([h, h[first:] + eps])``: noisy copies of its last
    ``B - first`` rows (``ops.perturb`` with the options of ``config``; ``mask``: those rows')."""
    part = h[first:] if first else h
    out = ops.perturb(part, seed, sigma=config.sigma, kind=config.noise, mask=mask,
                      n_anchors=config.n_anchors, backend=config.backend)
    return torch.cat([h[:first], out], dim=0) if first else out  # noisy_fraction < 1: [h, noisy rows]


def tap_block_output(stream, output, batch: int, noisy: int, *, last: bool, record: bool):
    """A block's ``[B + m, ...]`` output passed through a tap of the penalty ``stream`` (rows
    ``B-m:B`` clean, ``B:`` their noisy copies): after the last block only the clean half goes on
    to the head.  None (the output as it is) when the block did not return the doubled batch."""
    b, m = batch, noisy
    y = output if isinstance(output, torch.Tensor) else output[0] if isinstance(output, (tuple, list)) else None
    if not isinstance(y, torch.Tensor) or y.shape[0] != b + m:
        return None
    z = stream.tap(y, first=b - m, keep=b if last else b + m, record=record)
    return put_block_output(output, z, (b + m, b) if last else None)


def put_block_output(output, z: torch.Tensor, cut: tuple[int, int] | None = None):
    """A block's ``output`` (a tensor, tuple, list or named tuple) with its hidden state replaced by
    ``z``; with ``cut=(rows, keep)`` its other tensors of ``rows`` rows are cut to their first
    ``keep`` (after the last block only the clean half goes on to the head)."""
    if isinstance(output, torch.Tensor):
        return z
    rows, keep = cut if cut is not None else (None, None)
    rest = [v[:keep] if cut is not None and isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows
            else v for v in output[1:]]
    items = [z, *rest]
    return type(output)(items) if isinstance(output, tuple) and not hasattr(output, "_fields") \
        else items if isinstance(output, list) else type(output)(*items)
