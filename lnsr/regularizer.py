"""``lnsr.LNSR``: the hooks that run LNSR inside a model's own forward (docs/design.md §3).

Blocks below ``k`` run once on the batch of ``B``.  A pre-hook on block ``k`` replaces its input
``h`` by ``cat([h, h + eps])``; pre-hooks on blocks ``>= k`` double every other batch-sized tensor
argument; forward hooks collect each block's ``[2B, ...]`` output; the last block's hook computes
the penalty over all of them in one op and hands only the clean half on to the head.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops
from .dropout import DROPOUT_MODES, DropoutControl
from .models import block_batch_arg, find_blocks, unwrap

NORMALIZE_MODES = ("token", "element", "gain")


@dataclass
class _ForwardState:
    """What one regularised forward shares between its hooks; kept until the next forward so
    that an activation-checkpoint recomputation reuses the same seed and batch size."""
    active: bool = False          # the latest forward of the model is regularised
    depth: int = 0                # nesting of entry modules (wrapper -> model) in the running forward
    in_forward: bool = False      # inside the model's own forward (not a recomputation)
    seed: int = 0
    batch: int | None = None      # B, the clean batch, known once block k has run
    noisy: int | None = None      # m, the rows with a noisy copy (the last m of the batch; m = B by default)
    mask: torch.Tensor | None = None
    noise_energy: torch.Tensor | None = None   # s^2 of the `gain` normalisation
    ys: list = field(default_factory=list)
    doubled: dict = field(default_factory=dict)  # id(tensor) -> (tensor, cat([tensor, tensor]))
    loss_share: torch.Tensor | None = None  # add_to_loss: this call's share of num_items_in_batch


def _draw_seed() -> int:
    # From torch's default generator, so torch.manual_seed makes a run reproducible.
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())


def _fold_rank(seed: int, rank: int) -> int:
    # Each rank draws distinct noise although ranks usually share torch's seed: a Weyl step per rank.
    return (seed + rank * 0x9E3779B97F4A7C15) % 2**64


def _loss_shifts_labels(model) -> bool:
    """Whether the model's loss shifts labels (a causal LM), by the rule the Trainer counts items with."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except Exception:  # no transformers (or an older layout): count labels as they are
        return False
    return (LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
            and not getattr(getattr(model, "config", None), "is_encoder_decoder", False))


class LNSR:
    """Layerwise Noise Stability Regularization on a model's blocks.

    >>> reg = lnsr.LNSR(model, sigma=0.05, inject_at=0, lam=0.01)
    >>> loss = model(**batch).loss + reg.loss      # reg.loss = lam * P of this forward
    >>> reg.remove()                               # or: with lnsr.LNSR(model) as reg: ...

    Only training forwards with gradients enabled are regularised; eval mode and
    ``torch.no_grad()`` run the model untouched.

    ``add_to_loss=True`` adds ``lam * P`` to the loss the model computes itself (``outputs.loss`` of
    a ModelOutput, or a dict's ``"loss"``), so that any loop or trainer reading ``outputs.loss``
    (Hugging Face ``Trainer``, TRL's ``SFTTrainer``, Accelerate, Lightning) is regularised by
    attaching alone; do not add ``reg.loss`` again.  When the caller passes ``num_items_in_batch``
    (the Trainer under gradient accumulation) the term is weighted by this micro-batch's share of
    the items, i.e. divided by the accumulation steps for equal micro-batches, as in
    ``LNSRTrainer``; otherwise the caller's own division by the steps applies to it.  Nothing is
    added when the model returns no loss (no labels, a tuple, or a ``compute_loss_func``).
    """

    def __init__(self, model: nn.Module, *, sigma: float = 0.05, noise: str = "relative",
                 inject_at: int = 0, lam: float = 1.0, layer_weights=None, detach_clean: bool = False,
                 normalize: str = "token", dropout: str = "paired", n_anchors: int = ops.DEFAULT_ANCHORS,
                 blocks=None, backend: str = "auto", check_finite: bool = True, every: int = 1,
                 noisy_fraction: float = 1.0, rank: int | None = None, add_to_loss: bool = False):
        # Validate everything before touching the model: a bad argument changes nothing.
        self.sigma = ops.check_sigma(sigma)
        if noise not in ops.NOISE_KINDS:
            raise ValueError(f"noise must be one of {', '.join(ops.NOISE_KINDS)}, got {noise!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite float >= 0, got {lam!r}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, got {normalize!r}")
        if dropout not in DROPOUT_MODES:
            raise ValueError(f"dropout must be one of {', '.join(DROPOUT_MODES)}, got {dropout!r}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(ops.BACKENDS)}, got {backend!r}")
        if isinstance(n_anchors, bool) or not isinstance(n_anchors, int) or n_anchors < 1:
            raise ValueError(f"n_anchors must be a positive int, got {n_anchors!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1 (regularise one training forward in `every`), got {every!r}")
        if isinstance(noisy_fraction, bool) or not isinstance(noisy_fraction, (int, float)) \
                or not 0 < noisy_fraction <= 1:
            raise ValueError(f"noisy_fraction must be in (0, 1] (the share of the batch given a noisy copy), "
                             f"got {noisy_fraction!r}")
        if isinstance(inject_at, bool) or not isinstance(inject_at, int):
            raise TypeError(f"inject_at must be an int (block index; negative counts from the top), got {inject_at!r}")
        self.wrapper = model
        self.entry, self.model = unwrap(model)
        if backend != "auto":
            ops.dispatch.load_backend(backend)  # a missing explicit backend fails here, naming what to install
        else:  # load (and register the ops of) the device's backends now, not inside a traced forward
            ops.available_backends(self._device_of(model))
        self.blocks, self.blocks_found = find_blocks(self.model, blocks)
        n_blocks = len(self.blocks)
        if not -n_blocks <= inject_at < n_blocks:
            raise ValueError(f"inject_at={inject_at} is out of range for a model with {n_blocks} blocks: use "
                             f"0..{n_blocks - 1} (0 = the embeddings' output) or -{n_blocks}..-1")
        self.inject_at = inject_at % n_blocks
        n_reg = n_blocks - self.inject_at
        if layer_weights is None:
            weights = [1.0] * n_reg
        else:
            weights = [float(w) for w in layer_weights]
            if len(weights) != n_reg:
                raise ValueError(f"layer_weights needs one weight per regularised block ({n_reg} for "
                                 f"inject_at={self.inject_at} of {n_blocks}), got {len(weights)}")
            if not all(math.isfinite(w) and w >= 0 for w in weights):
                raise ValueError(f"layer_weights must be finite and >= 0, got {weights}")
        self.noise, self.lam, self.layer_weights = noise, float(lam), weights
        self.detach_clean, self.normalize, self.dropout = bool(detach_clean), normalize, dropout
        self.n_anchors, self.backend, self.check_finite = n_anchors, backend, bool(check_finite)
        self.every, self.noisy_fraction = every, float(noisy_fraction)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ValueError(f"rank must be None (from torch.distributed) or an int >= 0, got {rank!r}")
        self.rank = rank
        if not isinstance(add_to_loss, bool):
            raise TypeError(f"add_to_loss must be True or False, got {add_to_loss!r}")
        self.add_to_loss = add_to_loss
        self._shifts_labels = add_to_loss and _loss_shifts_labels(self.model)

        self.loss: torch.Tensor | None = None      # lam * P of the latest regularised forward
        self.penalty: torch.Tensor | None = None   # P (detached) of the latest regularised forward
        self.steps = 0                              # regularised forwards so far
        self.training_forwards = 0                  # training forwards with gradients (counts `every`)
        self._state = _ForwardState()
        self._positional = self._positional_names()  # the model's forward, for args given positionally
        self._dropout = DropoutControl(self.blocks[self.inject_at:], dropout, self._batch_split)
        self._handles = []
        self._install()

    # -- life cycle ------------------------------------------------------------------------------
    def _install(self) -> None:
        h = self._handles
        # The forward starts at the outermost module that is called: the object the user passed
        # (a DDP / PEFT / compile wrapper runs its hooks eagerly, with the user's kwargs) or the
        # plain model when it is wrapped later or called directly.  A depth count makes the
        # nested call a no-op.
        for entry in dict.fromkeys([self.wrapper, self.entry, self.model]):
            h.append(entry.register_forward_pre_hook(self._entry_pre, with_kwargs=True))
            h.append(entry.register_forward_hook(self._entry_post, always_call=True))
        for j in range(self.inject_at, len(self.blocks)):
            h.append(self.blocks[j].register_forward_pre_hook(self._make_block_pre(j), with_kwargs=True))
            h.append(self.blocks[j].register_forward_hook(self._make_block_post(j), always_call=True))
        self._dropout.install()

    def remove(self) -> None:
        """Remove every hook and restore dropout; the model is exactly as before. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._dropout.uninstall()
        self._state = _ForwardState()

    def _batch_split(self):
        """``(B, m)`` of the running regularised forward (rows ``B-m:B`` have noisy copies), else None."""
        st = self._state
        return None if st.batch is None else (st.batch, st.noisy)

    @property
    def seed(self) -> int:
        """The noise seed of the latest regularised forward (reused by recomputations)."""
        return self._state.seed

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "LNSR":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"LNSR(sigma={self.sigma}, noise={self.noise!r}, inject_at={self.inject_at}/{len(self.blocks)}, "
                f"lam={self.lam}, normalize={self.normalize!r}, dropout={self.dropout!r}, "
                f"detach_clean={self.detach_clean}, backend={self.backend!r}, blocks: {self.blocks_found})")

    # -- entry (the model's own forward) ----------------------------------------------------------
    def _rank(self) -> int:
        if self.rank is not None:
            return self.rank
        dist = torch.distributed
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @staticmethod
    def _device_of(model):
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _device(self):
        return self._device_of(self.model)

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

    def _entry_pre(self, module, args, kwargs):
        st = self._state
        if st.depth:
            st.depth += 1  # a nested entry of the same forward (wrapper -> model)
            return None
        result = self._start_forward(args, kwargs)
        st.depth = 1
        return result

    def _start_forward(self, args, kwargs):
        st = self._state
        self._dropout.deactivate()  # the previous forward's window ends here
        st.doubled.clear()
        st.ys = []
        st.active = self.model.training and torch.is_grad_enabled()
        if st.active:
            self.training_forwards += 1
            if (self.training_forwards - 1) % self.every:
                # `every`: this training forward runs plain; reg.loss is a zero that adds nothing.
                st.active = False
                self.loss = torch.zeros((), dtype=torch.float32, device=self._device())
        st.in_forward = st.active
        if not st.active:
            return None
        config = getattr(self.model, "config", None)
        ohs = self._kwarg("output_hidden_states", args, kwargs)
        if ohs or (ohs is None and getattr(config, "output_hidden_states", False)):
            st.active = st.in_forward = False
            raise ValueError("output_hidden_states=True is not supported during a regularised training forward "
                             "(blocks >= inject_at run on a doubled batch); call the model with "
                             "output_hidden_states=False, or in eval mode / under torch.no_grad()")
        past = self._kwarg("past_key_values", args, kwargs)
        use_cache = self._kwarg("use_cache", args, kwargs)
        if past is not None or use_cache:
            st.active = st.in_forward = False
            raise ValueError("a KV cache (past_key_values / use_cache=True) cannot be used during a regularised "
                             "training forward; pass use_cache=False and no past_key_values when training")
        mask = self._kwarg("attention_mask", args, kwargs)
        st.mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        st.loss_share = self._loss_share(args, kwargs) if self.add_to_loss else None
        st.seed = _fold_rank(_draw_seed(), self._rank())
        st.batch = st.noisy = None
        st.noise_energy = None
        self._dropout.activate()
        if use_cache is None and getattr(config, "use_cache", False):
            return args, {**kwargs, "use_cache": False}  # the model would otherwise build a cache
        return None

    def _entry_post(self, module, args, output):
        st = self._state
        if st.depth == 0:
            return None  # the pre-hook raised: nothing was started
        st.depth -= 1
        if st.depth:
            return None
        if st.active and st.in_forward:
            if len(st.ys) == len(self.blocks) - self.inject_at:
                # The penalty is computed here, outside every block: a block whose __call__ runs
                # inside an activation checkpoint must save the same tensors when recomputed.
                self._finish()
                if self.add_to_loss:
                    self._add_to_output_loss(output)
            else:  # the forward ended early (an exception): undo everything
                st.active = False
                self._dropout.deactivate()
        st.in_forward = False
        st.ys = []
        st.doubled.clear()
        return None

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
        if not isinstance(output, dict):  # ModelOutput is a dict; tuples cannot be told apart
            return
        loss = output.get("loss")
        if not isinstance(loss, torch.Tensor):
            return
        term = self.loss if self._state.loss_share is None else self.loss * self._state.loss_share
        output["loss"] = loss + term  # ModelOutput.__setitem__ also sets the attribute

    # -- blocks -----------------------------------------------------------------------------------
    def _double(self, x):
        """cat([x, x[B-m:]]) for batch-sized tensors (also inside tuples/lists), cached per forward."""
        st = self._state
        if isinstance(x, torch.Tensor):
            if x.dim() >= 2 and x.shape[0] == st.batch:
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

    def _check_no_cache(self, kwargs):
        for key, value in kwargs.items():
            if value is not None and type(value).__name__.endswith("Cache"):
                raise ValueError(f"block received a KV cache ({key}={type(value).__name__}) during a regularised "
                                 f"training forward; pass use_cache=False when training")

    def _make_block_pre(self, j):
        first = j == self.inject_at

        def pre_hook(module, args, kwargs):
            st = self._state
            if not st.active:
                return None
            h, where = block_batch_arg(args, kwargs)
            if h is None:
                raise TypeError(f"block {j} ({type(module).__name__}) received no hidden-state tensor as its first "
                                f"argument or as hidden_states=; pass blocks= with modules that take one")
            self._check_no_cache(kwargs)
            if first:
                h = self._perturb(j, module, h)
            elif st.batch is None or h.shape[0] != st.batch + st.noisy:
                raise RuntimeError(f"block {j} received a batch of {h.shape[0]} where the doubled batch of "
                                   f"{None if st.batch is None else st.batch + st.noisy} was expected; are the blocks "
                                   f"in execution order? pass blocks= bottom first")
            new_args = tuple(self._double(a) for a in args)
            new_kwargs = {key: self._double(v) for key, v in kwargs.items()}
            if where[0] == "args":
                new_args = (h,) + new_args[1:]
            else:
                new_kwargs[where[1]] = h
            return new_args, new_kwargs

        return pre_hook

    def _perturb(self, j, module, h):
        st = self._state
        if st.batch is None:
            st.batch = h.shape[0]
            st.noisy = max(1, min(st.batch, math.ceil(self.noisy_fraction * st.batch - 1e-9)))
        mask = st.mask
        if mask is not None and tuple(mask.shape) != tuple(h.shape[:-1]):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but the hidden state entering block "
                             f"{j} has token dims {tuple(h.shape[:-1])}; pass a [batch, seq_len] mask that "
                             f"matches the inputs")
        # One reduction and a host sync; skipped while torch.compile traces (it would break the graph).
        if self.check_finite and not torch.compiler.is_compiling() and not bool(torch.isfinite(h).all()):
            raise ValueError(f"non-finite values (NaN/Inf) in the hidden state entering block {j} "
                             f"({type(module).__name__}), where LNSR injects noise; check the inputs, the "
                             f"learning rate or the loss scale")
        b, first_noisy = st.batch, st.batch - st.noisy
        part = h[first_noisy:] if first_noisy else h
        pmask = None if mask is None else mask[first_noisy:]
        out = ops.perturb(part, st.seed, sigma=self.sigma, kind=self.noise, mask=pmask,
                          n_anchors=self.n_anchors, backend=self.backend)
        if first_noisy:  # noisy_fraction < 1: [h, noisy copies of the last m rows]
            out = torch.cat([h[:first_noisy], out], dim=0)
        if self.normalize == "gain" and st.in_forward:
            with torch.no_grad():
                m = None if pmask is None else pmask.to(torch.float32)
                eps_sq = (out[b:].float() - part.float()).pow(2).sum(-1)
                h_sq = part.float().pow(2).sum(-1)
                if m is not None:
                    eps_sq, h_sq = eps_sq * m, h_sq * m
                st.noise_energy = eps_sq.sum() / h_sq.sum().clamp_min(torch.finfo(torch.float32).tiny)
        return out

    def _make_block_post(self, j):
        last = j == len(self.blocks) - 1

        def post_hook(module, args, output):
            st = self._state
            if not st.active or st.batch is None:
                return None
            y = output if isinstance(output, torch.Tensor) else output[0] if isinstance(output, (tuple, list)) else None
            if not isinstance(y, torch.Tensor) or y.shape[0] != st.batch + st.noisy:
                return None  # an exception inside the block; _entry_post cleans up
            if st.in_forward:
                st.ys.append(y[st.batch - st.noisy:])  # [2m, ...]: clean rows then their noisy copies
            if not last:
                return None
            b = st.batch
            if isinstance(output, torch.Tensor):
                return output[:b]
            halves = [v[:b] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b + st.noisy else v
                      for v in output]
            return type(output)(halves) if isinstance(output, tuple) and not hasattr(output, "_fields") \
                else halves if isinstance(output, list) else type(output)(*halves)

        return post_hook

    def layer_weights_for(self, ys) -> list[float] | torch.Tensor:
        """The per-layer weights ``layer_penalty`` receives after ``normalize``."""
        w = self.layer_weights
        if self.normalize == "token":
            return w
        if self.normalize == "element":
            return [wj / y.shape[-1] for wj, y in zip(w, ys)]
        st = self._state
        with torch.no_grad():  # gain: divide by s^2 * mean masked ||y_clean||^2 (detached)
            b = st.noisy  # ys hold [2m, ...]
            m = self._penalty_mask()
            m = None if m is None else m.to(torch.float32)
            out = []
            for wj, y in zip(w, ys):
                sq = y[:b].float().pow(2).sum(-1)
                energy = (sq * m).sum() / m.sum().clamp_min(1.0) if m is not None else sq.mean()
                denom = float(st.noise_energy * energy)
                out.append(wj / denom if denom > 0 else 0.0)
            return out

    def _penalty_mask(self):
        st = self._state
        return None if st.mask is None else st.mask[st.batch - st.noisy:]

    def _finish(self) -> None:
        st = self._state
        ys = st.ys
        penalty = ops.layer_penalty(ys, mask=self._penalty_mask(), weights=self.layer_weights_for(ys),
                                    detach_clean=self.detach_clean, backend=self.backend)
        self.penalty = penalty.detach()
        self.loss = self.lam * penalty
        self.steps += 1
        st.ys = []
        st.in_forward = False  # later hooks of this forward (and recomputations) only transform
