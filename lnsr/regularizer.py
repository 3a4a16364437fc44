"""``lnsr.LNSR``: the hooks that run LNSR inside a model's own forward (docs/design.md §3).

Blocks below ``k`` run once on the batch of ``B``.  A pre-hook on block ``k`` replaces its input
``h`` by ``cat([h, h + eps])``; pre-hooks on blocks ``>= k`` double every other batch-sized tensor
argument; forward hooks pass each block's ``[2B, ...]`` output through a tap of the streaming
penalty (``lnsr.ops.PenaltyStream``: its backward adds that layer's penalty gradient into the
block's own) and the last one hands only the clean half on to the head; when the model's forward
returns, the penalty's value over all of them is computed in one op.
"""
from __future__ import annotations

import functools
import inspect
import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops
from .ops.backend import seed_bits
from .config import NORMALIZE_MODES, LNSRConfig
from .dropout import DropoutControl
from .models import find_blocks, replace_block_input, unwrap

__all__ = ["LNSR", "LNSRConfig", "NORMALIZE_MODES", "gain_weights"]

# The phases of the hooks.  OFF: the hooks pass everything through (eval, no_grad, an `every`
# skip, no forward yet).  RUN: a regularised forward is running; block k injects the noise, blocks
# >= k run on the doubled batch and their outputs are recorded.  REPLAY: that forward has finished;
# the block hooks still transform (same seed, same rows) but record nothing, so that an
# activation-checkpoint recomputation during backward sees what the forward saw.
OFF, RUN, REPLAY = "off", "run", "replay"


@dataclass
class _Forward:
    """What the hooks of one forward share; kept until the next forward starts (for REPLAY)."""
    phase: str = OFF
    depth: int = 0                # nesting of entry modules (wrapper -> model) in the running call
    seed: int = 0
    # the seed as a device seed (its 64 bits in an int64 on the model's device), refilled each step:
    # traced code passes it to the kernels unread (see _inject)
    seed_tensor: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    batch: int | None = None      # B, the clean batch, known once block k has run
    noisy: int | None = None      # m, the rows with a noisy copy (the last m of the batch; m = B by default)
    mask: torch.Tensor | None = None
    loss_share: torch.Tensor | None = None    # add_to_loss: this call's share of num_items_in_batch
    injected: tuple | None = None             # normalize="gain": (h, h + eps) at block k, detached
    stream: ops.PenaltyStream | None = None   # the block outputs met so far (RUN), their taps
    doubled: dict = field(default_factory=dict)  # id(tensor) -> (tensor, cat([tensor, tensor[B-m:]]))


def _draw_seed() -> int:
    # From torch's default generator, so torch.manual_seed makes a run reproducible.
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())


def _fold_rank(seed: int, rank: int) -> int:
    # Each rank draws distinct noise although ranks usually share torch's seed: a Weyl step per rank.
    return (seed + rank * 0x9E3779B97F4A7C15) % 2**64


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


def _loss_shifts_labels(model) -> bool:
    """Whether the model's loss shifts labels (a causal LM), by the rule the Trainer counts items with."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except Exception:  # no transformers (or an older layout): count labels as they are
        return False
    return (LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
            and not getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _attached_lnsr(modules):
    """The ``LNSR`` whose hooks are on any of ``modules``, or None."""
    for mod in modules:
        for hooks in (mod._forward_pre_hooks, mod._forward_hooks):
            for hook in hooks.values():
                owner = getattr(hook, "lnsr_owner", None)
                if owner is not None and owner() is not None:
                    return owner()
    return None


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
    ``reg.loss`` again.  When the caller passes ``num_items_in_batch`` (the Trainer under gradient
    accumulation) the term is weighted by this micro-batch's share of the items, i.e. divided by
    the accumulation steps for equal micro-batches, as in ``LNSRTrainer``; otherwise the caller's
    own division by the steps applies to it.  Nothing is added when the model returns no loss (no
    labels, a tuple, a ``compute_loss_func``, or a trainer that computes the loss from the logits
    itself, as TRL's ``SFTTrainer`` 1.x does).
    """

    def __init__(self, model: nn.Module, config: LNSRConfig | None = None, **options):
        # Every option is validated (by LNSRConfig) before the model is touched: bad input changes nothing.
        self.config = cfg = LNSRConfig.make(config, **options)
        self.wrapper = model
        self.entry, self.model = unwrap(model)
        other = _attached_lnsr([*self.wrapper.modules(), *self.model.modules()])
        if other is not None:
            raise RuntimeError(f"this model already has an lnsr.LNSR attached ({other!r}); call .remove() on it "
                               f"first (or attach with `with lnsr.LNSR(model) as reg:`, which removes it at the end)")
        if cfg.backend != "auto":
            ops.dispatch.load_backend(cfg.backend)  # a missing explicit backend fails here, naming what to install
        else:  # load (and register the ops of) the device's backends now, not inside a traced forward
            ops.available_backends(self._device())
        self.blocks, self.blocks_found = find_blocks(self.model, cfg.blocks)
        self.inject_at, self.layer_weights = cfg.resolve(len(self.blocks))

        self.loss = self._zero()                   # lam * P of the latest forward (0 if not regularised)
        self.penalty: torch.Tensor | None = None   # P (detached) of the latest regularised forward
        self.steps = 0                              # regularised forwards so far
        self.training_forwards = 0                  # training forwards with gradients (counts `every`)
        self._fwd = _Forward()
        self._positional = self._positional_names()  # the model's forward, for args given positionally
        self._shifts_labels = cfg.add_to_loss and _loss_shifts_labels(self.model)
        self._dropout = DropoutControl(self.blocks[self.inject_at:], cfg.dropout, self._batch_split)
        self._handles = []
        self._install()

    def __getattr__(self, name):
        # The options read as attributes (reg.lam, reg.sigma, ...); reg.config holds them.
        config = self.__dict__.get("config")
        if config is not None and name in LNSRConfig.names():
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
        st.doubled, st.injected = {}, None
        if st.phase != REPLAY:
            st.stream = None
        return None

    def _block_pre(self, j, module, args, kwargs):
        st = self._fwd
        if st.phase == OFF:
            return None
        self._check_no_cache(kwargs)

        def enter(h):
            if j == self.inject_at:
                return self._inject(j, module, h)
            if st.batch is None or h.shape[0] != st.batch + st.noisy:
                raise RuntimeError(f"block {j} received a batch of {h.shape[0]} where the doubled batch of "
                                   f"{None if st.batch is None else st.batch + st.noisy} was expected; are the "
                                   f"blocks in execution order? pass blocks= bottom first")
            return h

        args, kwargs = replace_block_input(args, kwargs, enter, who=f"block {j} ({type(module).__name__})")
        # h now holds B + m rows, so only the other batch-sized arguments are doubled
        return tuple(self._double(a) for a in args), {key: self._double(v) for key, v in kwargs.items()}

    def _block_post(self, j, module, args, output):
        st = self._fwd
        if st.phase == OFF or st.batch is None:
            return None
        b, m = st.batch, st.noisy
        y = output if isinstance(output, torch.Tensor) else output[0] if isinstance(output, (tuple, list)) else None
        if not isinstance(y, torch.Tensor) or y.shape[0] != b + m:
            return None  # an exception inside the block; _entry_post cleans up
        last = j == len(self.blocks) - 1
        # The tap: rows b-m:b are clean, b: their noisy copies; the head sees the clean half only.
        # A recomputation (REPLAY) taps again, so that it saves what the forward saved.
        z = st.stream.tap(y, first=b - m, keep=b if last else b + m, record=st.phase == RUN)
        if isinstance(output, torch.Tensor):
            return z
        rest = [v[:b] if last and isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b + m else v
                for v in output[1:]]
        items = [z, *rest]
        return type(output)(items) if isinstance(output, tuple) and not hasattr(output, "_fields") \
            else items if isinstance(output, list) else type(output)(*items)

    # -- one forward: begin, inject, finish -----------------------------------------------------------
    def _begin(self, args, kwargs):
        """Start a call of the model: decide whether it is regularised; returns new (args, kwargs) or None."""
        st = self._fwd
        self._dropout.deactivate()  # the previous forward's window ends here
        st.phase, st.batch, st.noisy, st.stream, st.doubled, st.injected = OFF, None, None, None, {}, None
        self.loss = self._zero()  # what a forward that is not regularised leaves
        if not (self.model.training and torch.is_grad_enabled()):
            return None
        self.training_forwards += 1
        if (self.training_forwards - 1) % self.config.every:
            return None  # `every`: this training forward runs plain
        config = getattr(self.model, "config", None)
        ohs = self._kwarg("output_hidden_states", args, kwargs)
        if ohs or (ohs is None and getattr(config, "output_hidden_states", False)):
            raise ValueError("output_hidden_states=True is not supported during a regularised training forward "
                             "(blocks >= inject_at run on a doubled batch); call the model with "
                             "output_hidden_states=False, or in eval mode / under torch.no_grad()")
        use_cache = self._kwarg("use_cache", args, kwargs)
        if self._kwarg("past_key_values", args, kwargs) is not None or use_cache:
            raise ValueError("a KV cache (past_key_values / use_cache=True) cannot be used during a regularised "
                             "training forward; pass use_cache=False and no past_key_values when training")
        mask = self._kwarg("attention_mask", args, kwargs)
        st.mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        st.loss_share = self._loss_share(args, kwargs) if self.config.add_to_loss else None
        st.seed = _fold_rank(_draw_seed(), self._rank())
        dev = self._device()
        if st.seed_tensor.device != dev:
            st.seed_tensor = torch.zeros((), dtype=torch.int64, device=dev)
        st.seed_tensor.fill_(seed_bits(st.seed))  # the same tensor every step, read by traced code (see _inject)
        st.phase = RUN
        self._dropout.activate()
        if use_cache is None and getattr(config, "use_cache", False):
            return args, {**kwargs, "use_cache": False}  # the model would otherwise build a cache
        return None

    def _inject(self, j, module, h):
        """Block k's input ``h`` [B, ...] -> ``cat([h, h[B-m:] + eps])`` (RUN and REPLAY alike)."""
        st, cfg = self._fwd, self.config
        if st.batch is None:
            st.batch = h.shape[0]
            st.noisy = max(1, min(st.batch, math.ceil(cfg.noisy_fraction * st.batch - 1e-9)))
        if st.stream is None:
            st.stream = ops.PenaltyStream(mask=self._penalty_mask(), detach_clean=cfg.detach_clean,
                                          backend=cfg.backend)
        mask = st.mask
        if mask is not None and tuple(mask.shape) != tuple(h.shape[:-1]):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but the hidden state entering block "
                             f"{j} has token dims {tuple(h.shape[:-1])}; pass a [batch, seq_len] mask that "
                             f"matches the inputs")
        # One reduction and a host sync; skipped while torch.compile traces (it would break the graph).
        if cfg.check_finite and not torch.compiler.is_compiling() and not bool(torch.isfinite(h).all()):
            raise ValueError(f"non-finite values (NaN/Inf) in the hidden state entering block {j} "
                             f"({type(module).__name__}), where LNSR injects noise; check the inputs, the "
                             f"learning rate or the loss scale")
        first = st.batch - st.noisy
        part = h[first:] if first else h
        # Traced code passes the seed as a device tensor: an int would be a guarded constant (each
        # step's new seed would compile a new graph), and a host read would freeze the seed of a
        # captured CUDA graph; the kernels read it on the device (issue #14).
        seed = st.seed if not torch.compiler.is_compiling() else \
            st.seed_tensor if st.seed_tensor.device == h.device else st.seed_tensor.to(h.device)
        out = ops.perturb(part, seed, sigma=cfg.sigma, kind=cfg.noise, mask=self._penalty_mask(),
                          n_anchors=cfg.n_anchors, backend=cfg.backend)
        if first:  # noisy_fraction < 1: [h, noisy copies of the last m rows]
            out = torch.cat([h[:first], out], dim=0)
        if cfg.normalize == "gain" and st.phase == RUN:
            st.injected = (part.detach(), out[st.batch:].detach())
        return out

    def _finish(self, output) -> None:
        st, cfg = self._fwd, self.config
        ys, mask = st.stream.ys, self._penalty_mask()
        if cfg.normalize == "token":
            weights = self.layer_weights
        elif cfg.normalize == "element":
            weights = [w / y.shape[-1] for w, y in zip(self.layer_weights, ys)]
        else:
            weights = gain_weights(self.layer_weights, *st.injected, ys, mask)
        penalty = st.stream.loss(weights)
        self.penalty = penalty.detach()
        self.loss = cfg.lam * penalty
        self.steps += 1
        if cfg.add_to_loss:
            self._add_to_output_loss(output)

    # -- helpers ------------------------------------------------------------------------------------
    def _batch_split(self):
        """``(B, m)`` of the running regularised forward (rows ``B-m:B`` have noisy copies), else None."""
        st = self._fwd
        return None if st.batch is None else (st.batch, st.noisy)

    def _penalty_mask(self):
        st = self._fwd
        return None if st.mask is None else st.mask[st.batch - st.noisy:]

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32, device=self._device())

    def _rank(self) -> int:
        if self.config.rank is not None:
            return self.config.rank
        dist = torch.distributed
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def _device(self):
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _positional_names(self) -> list[str]:
        try:
            params = inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            return []
        return [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def _kwarg(self, name, args, kwargs):
        if name in kwargs:
            return kwargs[name]
        names = self._positional
        if name in names and names.index(name) < len(args):
            return args[names.index(name)]
        return None

    def _double(self, x):
        """cat([x, x[B-m:]]) for batch-sized tensors (also inside tuples/lists), cached per forward."""
        st = self._fwd
        if isinstance(x, torch.Tensor):
            if x.dim() >= 2 and x.shape[0] == st.batch:
                if torch.compiler.is_compiling():
                    # No identity lookup in traced code: Dynamo guards on the tensor's id, which
                    # changes every step, so each step would compile a new graph (issue #14).
                    return torch.cat([x, x[st.batch - st.noisy:]], dim=0)
                hit = st.doubled.get(id(x))
                if hit is None or hit[0] is not x:
                    hit = (x, torch.cat([x, x[st.batch - st.noisy:]], dim=0))
                    st.doubled[id(x)] = hit
                return hit[1]
            return x
        if isinstance(x, tuple) and not hasattr(x, "_fields"):
            return tuple(self._double(v) for v in x)
        if isinstance(x, list):
            return [self._double(v) for v in x]
        return x

    @staticmethod
    def _check_no_cache(kwargs):
        for key, value in kwargs.items():
            if value is not None and type(value).__name__.endswith("Cache"):
                raise ValueError(f"block received a KV cache ({key}={type(value).__name__}) during a regularised "
                                 f"training forward; pass use_cache=False when training")

    def _loss_share(self, args, kwargs):
        """``n / num_items_in_batch`` when the caller passes ``num_items_in_batch`` (the Hugging Face
        Trainer does under gradient accumulation): the model's loss is then a sum over this call's
        ``n`` label items divided by the accumulated batch's count, and the caller does not divide
        by the accumulation steps, so the penalty is weighted by the same share (``1 / steps`` for
        equal micro-batches, as ``LNSRTrainer``).  ``n`` counts labels != -100 as the Trainer does
        (``labels[..., 1:]`` for a causal LM's shifted loss, or ``shift_labels``)."""
        total = self._kwarg("num_items_in_batch", args, kwargs)
        labels = self._kwarg("shift_labels", args, kwargs)
        if labels is None:
            labels = self._kwarg("labels", args, kwargs)
            if isinstance(labels, torch.Tensor) and self._shifts_labels:
                labels = labels[..., 1:]
        if total is None or not isinstance(labels, torch.Tensor):
            return None
        n = labels.ne(-100).sum().to(torch.float32)
        total = torch.as_tensor(total, device=n.device).to(torch.float32).reshape(-1)[0]
        return (n / total.clamp_min(1.0)).detach()

    def _add_to_output_loss(self, output) -> None:
        """``output.loss += lam * P`` (times the accumulation share) when the model computed a loss."""
        if not isinstance(output, dict):  # ModelOutput is a dict; a tuple's loss cannot be told apart
            return
        loss = output.get("loss")
        if not isinstance(loss, torch.Tensor):
            return
        share = self._fwd.loss_share
        output["loss"] = loss + (self.loss if share is None else self.loss * share)  # also sets .loss
