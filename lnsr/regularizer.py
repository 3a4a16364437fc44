"""``lnsr.LNSR``: the hooks that run LNSR inside a model's own forward (docs/design.md §3).

Blocks below ``k`` run once on the batch of ``B``.  A pre-hook on block ``k`` replaces its input
``h`` by ``cat([h, h + eps])``; pre-hooks on blocks ``>= k`` double every other batch-sized tensor
argument; forward hooks pass each block's ``[2B, ...]`` output through a tap of the streaming
penalty (``lnsr.ops.PenaltyStream``: its backward adds that layer's penalty gradient into the
block's own) and the last one hands only the clean half on to the head; when the model's forward
returns, the penalty's value over all of them is computed in one op.

What the hooks read from the calls and do to them (argument reading, the runtime checks, batch
doubling) is in ``lnsr.forward``; the penalty's weight in a loss under gradient accumulation
(``add_to_loss``, shared with ``LNSRTrainer``) in ``lnsr.loss_share``.
"""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops
from .config import NORMALIZE_MODES, LNSRConfig
from .dropout import DropoutControl
from .forward import (CallArgs, check_block_call, check_doubled, check_injected, check_model_call, double_call,
                      noisy_double, tap_block_output)
from .loss_share import add_to_output_loss, label_items, loss_shifts_labels
from .models import find_blocks, replace_block_input, unwrap

__all__ = ["LNSR", "LNSRConfig", "NORMALIZE_MODES", "gain_weights"]

# The phases of the hooks.  OFF: the hooks pass everything through (eval, no_grad, an `every`
# skip, no forward yet).  RUN: a regularised forward is running; block k injects the noise, blocks
# >= k run on the doubled batch and their outputs are recorded.  REPLAY: that forward has finished;
# the block hooks still transform (same seed, same rows) but record nothing, so that an
# activation-checkpoint recomputation during backward sees what the forward saw.
OFF, RUN, REPLAY = "off", "run", "replay"

_OPTIONS = frozenset(LNSRConfig.names())  # read as attributes of an LNSR (reg.lam, reg.sigma, ...)


@dataclass
class _Forward:
    """What the hooks of one forward share; kept until the next forward starts (for REPLAY)."""
    phase: str = OFF
    depth: int = 0                # nesting of entry modules (wrapper -> model) in the running call
    seed: int = 0
    # the seed as a device seed (its 64 bits in an int64 on the model's device), refilled each step:
    # traced code passes it to the kernels unread (see seed_for)
    seed_tensor: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    batch: int | None = None      # B, the clean batch, known once block k has run
    noisy: int | None = None      # m, the rows with a noisy copy (the last m of the batch; m = B by default)
    mask: torch.Tensor | None = None
    items: torch.Tensor | None = None         # add_to_loss: this call's label items (loss_share.label_items)
    num_items: object = None                  # add_to_loss: the caller's num_items_in_batch
    injected: tuple | None = None             # normalize="gain": (h, h + eps) at block k, detached
    stream: ops.PenaltyStream | None = None   # the block outputs met so far (RUN), their taps
    doubled: dict = field(default_factory=dict)  # id(tensor) -> (tensor, cat([tensor, tensor[B-m:]]))

    def reset(self) -> None:
        """What a new call of the model starts from (not regularised until _begin says so)."""
        self.phase, self.batch, self.noisy, self.stream, self.doubled, self.injected = OFF, None, None, None, {}, None

    def reseed(self, seed: int, device) -> None:
        """The noise seed of this forward; also as its 64 bits in ``seed_tensor`` on ``device``."""
        self.seed = seed
        if self.seed_tensor.device != device:
            self.seed_tensor = torch.zeros((), dtype=torch.int64, device=device)
        # the same tensor every step, read by traced code; seed is in [0, 2**64) by construction
        self.seed_tensor.fill_(seed - (1 << 64) if seed >= (1 << 63) else seed)

    def seed_for(self, device):
        """The seed ``ops.perturb`` gets: the int, or while torch.compile traces the device seed.

        Traced code passes the seed as a device tensor: an int would be a guarded constant (each
        step's new seed would compile a new graph), and a host read would freeze the seed of a
        captured CUDA graph; the kernels read it on the device (issue #14)."""
        if not torch.compiler.is_compiling():
            return self.seed
        return self.seed_tensor if self.seed_tensor.device == device else self.seed_tensor.to(device)

    def end_call(self) -> None:
        """The model's call returned: drop what only it needed (the stream stays for REPLAY)."""
        self.doubled, self.injected = {}, None
        if self.phase != REPLAY:
            self.stream = None

    def size(self, batch: int, noisy_fraction: float) -> None:
        """``B`` and ``m``, set by the first call of block k in this forward (kept for REPLAY)."""
        if self.batch is None:
            self.batch = batch
            self.noisy = max(1, min(batch, math.ceil(noisy_fraction * batch - 1e-9)))

    def split(self):
        """``(B, m)`` of the running regularised forward (rows ``B-m:B`` have noisy copies), else None."""
        return None if self.batch is None else (self.batch, self.noisy)

    def penalty_mask(self):
        """The attention mask of the rows with a noisy copy, or None."""
        return None if self.mask is None else self.mask[self.batch - self.noisy:]


def _draw_seed() -> int:
    # From torch's default generator, so torch.manual_seed makes a run reproducible.
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())


def _fold_rank(seed: int, rank: int) -> int:
    # Each rank draws distinct noise although ranks usually share torch's seed: a Weyl step per rank.
    return (seed + rank * 0x9E3779B97F4A7C15) % 2**64


def _rank(rank: int | None) -> int:
    """The configured rank, else torch.distributed's (0 when it is not initialised)."""
    if rank is not None:
        return rank
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _zero(model: nn.Module) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=_device(model))


def gain_weights(weights, h, h_noisy, ys, mask=None) -> list[float]:
    """The per-layer weights of ``normalize="gain"``: ``w_j / (s^2 * E_j)``, a penalty free of the
    noise's and the activations' scale.

    ``s^2 = sum m ||h~ - h||^2 / sum m ||h||^2`` is the injected noise's energy relative to the
    hidden state it enters (``h``, ``h_noisy``: ``[m, ..., H]``), ``E_j`` the mean masked squared
    norm of block ``j``'s clean output (the first half of ``ys[j]``: ``[2m, ..., H_j]``); ``mask``
    ``[m, ...]`` or None.  All detached, in fp32; a zero denominator gives weight 0.
    """
    with torch.no_grad():
        m = None if mask is None else mask.to(torch.float32)
        eps_sq = (h_noisy.float() - h.float()).pow(2).sum(-1)
        h_sq = h.float().pow(2).sum(-1)
        if m is not None:
            eps_sq, h_sq = eps_sq * m, h_sq * m
        s2 = eps_sq.sum() / h_sq.sum().clamp_min(torch.finfo(torch.float32).tiny)
        out = []
        for wj, y in zip(weights, ys):
            sq = y[:y.shape[0] // 2].float().pow(2).sum(-1)
            energy = (sq * m).sum() / m.sum().clamp_min(1.0) if m is not None else sq.mean()
            denom = float(s2 * energy)
            out.append(wj / denom if denom > 0 else 0.0)
        return out


def _penalty_weights(normalize: str, weights, ys, injected, mask):
    """The per-layer weights the penalty is computed with: ``token`` (``weights``), ``element`` (over
    each block's width) or ``gain`` (``gain_weights``)."""
    if normalize == "token":
        return weights
    if normalize == "element":
        return [w / y.shape[-1] for w, y in zip(weights, ys)]
    return gain_weights(weights, *injected, ys, mask)


def _attached_lnsr(modules):
    """The ``LNSR`` whose hooks are on any of ``modules``, or None."""
    for mod in modules:
        for hooks in (mod._forward_pre_hooks, mod._forward_hooks):
            for hook in hooks.values():
                owner = getattr(hook, "lnsr_owner", None)
                if owner is not None and owner() is not None:
                    return owner()
    return None


def _refuse_second(modules) -> None:
    """One ``LNSR`` per model: raise when one is attached to any of ``modules``."""
    other = _attached_lnsr(modules)
    if other is not None:
        raise RuntimeError(f"this model already has an lnsr.LNSR attached ({other!r}); call .remove() on it "
                           f"first (or attach with `with lnsr.LNSR(model) as reg:`, which removes it at the end)")


def _load_backends(backend: str, device) -> None:
    if backend != "auto":
        ops.dispatch.load_backend(backend)  # a missing explicit backend fails here, naming what to install
    else:  # load (and register the ops of) the device's backends now, not inside a traced forward
        ops.available_backends(device)


class LNSR:
    """Layerwise Noise Stability Regularization on a model's blocks.

    >>> reg = lnsr.LNSR(model, sigma=0.05, inject_at=0, lam=0.01)
    >>> loss = model(**batch).loss + reg.loss      # reg.loss = lam * P of this forward
    >>> reg.remove()                               # or: with lnsr.LNSR(model) as reg: ...

    Options: keyword arguments or an ``lnsr.LNSRConfig`` (``LNSR(model, config, lam=...)``: the
    keywords override it); they are validated before the model is touched.  Only training forwards
    with gradients enabled are regularised; eval mode and ``torch.no_grad()`` run the model
    untouched, and after any forward that is not regularised ``reg.loss`` is a zero (no graph).
    One ``LNSR`` per model: ``remove()`` the first before attaching another.

    ``add_to_loss=True`` adds ``lam * P`` to the loss the model computes itself (``outputs.loss`` of
    a ModelOutput, or a dict's ``"loss"``), so that any loop or trainer reading ``outputs.loss``
    (Hugging Face ``Trainer``, Accelerate, Lightning) is regularised by attaching alone; do not add
    ``reg.loss`` again.  Under gradient accumulation it is weighted as in ``LNSRTrainer``, by one rule
    (``lnsr.loss_share``): with ``num_items_in_batch`` by this micro-batch's share of the items,
    else the caller's own division by the steps applies.  Nothing is added when the model returns
    no loss (no labels, a tuple, a ``compute_loss_func``, or a trainer that computes the loss from
    the logits itself, as TRL's ``SFTTrainer`` 1.x does).
    """

    def __init__(self, model: nn.Module, config: LNSRConfig | None = None, **options):
        # Every option is validated (by LNSRConfig) before the model is touched, once: the hooks trust them.
        self.config = cfg = LNSRConfig.make(config, **options)
        self.wrapper = model
        self.entry, self.model = unwrap(model)
        _refuse_second([*self.wrapper.modules(), *self.model.modules()])
        _load_backends(cfg.backend, _device(self.model))
        self.blocks, self.blocks_found = find_blocks(self.model, cfg.blocks)
        self.inject_at, self.layer_weights = cfg.resolve(len(self.blocks))
        self.loss = _zero(self.model)              # lam * P of the latest forward (0 if not regularised)
        self.penalty: torch.Tensor | None = None   # P (detached) of the latest regularised forward
        self.steps = 0                              # regularised forwards so far
        self.training_forwards = 0                  # training forwards with gradients (counts `every`)
        self._fwd = _Forward()
        self._call = CallArgs(self.model.forward)   # reads the model's arguments, also positional ones
        self._shifts_labels = cfg.add_to_loss and loss_shifts_labels(self.model)
        self._who = [f"block {j} ({type(b).__name__})" for j, b in enumerate(self.blocks)]  # for errors
        self._dropout = DropoutControl(self.blocks[self.inject_at:], cfg.dropout, lambda: self._fwd.split())
        self._handles = []
        self._install()

    def __getattr__(self, name):
        # The options read as attributes (reg.lam, reg.sigma, ...); reg.config holds them.
        config = self.__dict__.get("config")
        if config is not None and name in _OPTIONS:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def rank(self) -> int | None:
        return self.config.rank

    @rank.setter
    def rank(self, value) -> None:
        self.config = self.config.replace(rank=value)

    # -- life cycle ------------------------------------------------------------------------------
    def _install(self) -> None:
        owner = weakref.ref(self)

        def add(register, fn, *extra, **kw):
            hook = functools.partial(fn, *extra)
            hook.lnsr_owner = owner  # marks the hook as ours: a second LNSR on this model is refused
            self._handles.append(register(hook, **kw))

        # The forward starts at the outermost module that is called: the object the user passed
        # (a DDP / PEFT / compile wrapper runs its hooks eagerly, with the user's kwargs) or the
        # plain model when it is wrapped later or called directly.  A depth count makes the
        # nested call a no-op.
        for entry in dict.fromkeys([self.wrapper, self.entry, self.model]):
            add(entry.register_forward_pre_hook, self._entry_pre, with_kwargs=True)
            add(entry.register_forward_hook, self._entry_post, always_call=True)
        for j in range(self.inject_at, len(self.blocks)):
            add(self.blocks[j].register_forward_pre_hook, self._block_pre, j, with_kwargs=True)
            add(self.blocks[j].register_forward_hook, self._block_post, j, always_call=True)
        self._dropout.install()

    def remove(self) -> None:
        """Remove every hook and restore dropout; the model is exactly as before. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._dropout.uninstall()
        self._fwd = _Forward()

    @property
    def seed(self) -> int:
        """The noise seed of the latest regularised forward (reused by recomputations)."""
        return self._fwd.seed

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "LNSR":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        c = self.config
        return (f"LNSR(sigma={c.sigma}, noise={c.noise!r}, inject_at={self.inject_at}/{len(self.blocks)}, "
                f"lam={c.lam}, normalize={c.normalize!r}, dropout={c.dropout!r}, detach_clean={c.detach_clean}, "
                f"backend={c.backend!r}, add_to_loss={c.add_to_loss}, blocks: {self.blocks_found})")

    # -- the hooks (phases OFF / RUN / REPLAY, see the top of this file) ----------------------------
    def _entry_pre(self, module, args, kwargs):
        st = self._fwd
        if st.depth:
            st.depth += 1  # a nested entry of the same call (wrapper -> model)
            return None
        result = self._begin(args, kwargs)  # if it raises, depth stays 0 and _entry_post ignores the call
        st.depth = 1
        return result

    def _entry_post(self, module, args, output):
        st = self._fwd
        if st.depth == 0:
            return None  # the pre-hook raised: nothing was started
        st.depth -= 1
        if st.depth:
            return None  # a nested entry returned
        if st.phase == RUN:
            if st.stream is not None and len(st.stream.ys) == len(self.blocks) - self.inject_at:
                # Computed here, outside every block: a block whose __call__ runs inside an
                # activation checkpoint must save the same tensors when recomputed.
                self._finish(output)
                st.phase = REPLAY
            else:  # the forward ended early (an exception): undo everything
                st.phase = OFF
                self._dropout.deactivate()
        st.end_call()
        return None

    def _block_pre(self, j, module, args, kwargs):
        st = self._fwd
        if st.phase == OFF:
            return None
        check_block_call(kwargs)
        args, kwargs = replace_block_input(args, kwargs, functools.partial(self._enter, j, module), who=self._who[j])
        # h now holds B + m rows, so only the other batch-sized arguments are doubled
        return double_call(args, kwargs, st.batch, st.noisy, st.doubled)

    def _block_post(self, j, module, args, output):
        st = self._fwd
        if st.phase == OFF or st.batch is None:
            return None
        # None if not doubled (an exception in the block: _entry_post cleans up); REPLAY taps again, unrecorded
        return tap_block_output(st.stream, output, st.batch, st.noisy, last=j == len(self.blocks) - 1,
                                record=st.phase == RUN)

    # -- one forward: begin, enter block k, finish -----------------------------------------------------------
    def _begin(self, args, kwargs):
        """Start a call of the model: decide whether it is regularised; returns new (args, kwargs) or None."""
        st, cfg = self._fwd, self.config
        self._dropout.deactivate()  # the previous forward's window ends here
        st.reset()
        self.loss = _zero(self.model)  # what a forward that is not regularised leaves
        if not (self.model.training and torch.is_grad_enabled()):
            return None
        self.training_forwards += 1
        if (self.training_forwards - 1) % cfg.every:
            return None  # `every`: this training forward runs plain
        read = self._call.reader(args, kwargs)
        st.mask, no_cache = check_model_call(read, self.model)  # no hidden states out, no KV cache
        st.num_items = read("num_items_in_batch") if cfg.add_to_loss else None
        st.items = None if st.num_items is None else \
            label_items(read("labels"), read("shift_labels"), shifts=self._shifts_labels)
        st.reseed(_fold_rank(_draw_seed(), _rank(cfg.rank)), _device(self.model))
        st.phase = RUN
        self._dropout.activate()
        return (args, {**kwargs, "use_cache": False}) if no_cache else None  # else the model builds a cache

    def _enter(self, j, module, h):
        """The hidden state entering block ``j``: block k's ``h`` [B, ...] -> ``cat([h, h[B-m:] + eps])``
        (RUN and REPLAY alike); a later block's (the doubled batch, checked) as it is."""
        st, cfg = self._fwd, self.config
        if j != self.inject_at:
            return check_doubled(h, j, st.batch, st.noisy)
        st.size(h.shape[0], cfg.noisy_fraction)
        mask, first = st.penalty_mask(), st.batch - st.noisy
        if st.stream is None:
            st.stream = ops.PenaltyStream(mask=mask, detach_clean=cfg.detach_clean, backend=cfg.backend)
        check_injected(h, st.mask, j, module, cfg.check_finite)  # the mask's shape, NaN/Inf
        out = noisy_double(h, first, st.seed_for(h.device), cfg, mask)
        if cfg.normalize == "gain" and st.phase == RUN:
            st.injected = ((h[first:] if first else h).detach(), out[st.batch:].detach())
        return out

    def _finish(self, output) -> None:
        st, cfg = self._fwd, self.config
        weights = _penalty_weights(cfg.normalize, self.layer_weights, st.stream.ys, st.injected, st.penalty_mask())
        penalty = st.stream.loss(weights)
        self.penalty = penalty.detach()
        self.loss = cfg.lam * penalty
        self.steps += 1
        if cfg.add_to_loss:  # outputs.loss += lam * P, weighted as the task loss (lnsr.loss_share)
            add_to_output_loss(output, self.loss, items=st.items, num_items_in_batch=st.num_items)
