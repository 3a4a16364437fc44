"""``LNSRConfig``: every option of ``lnsr.LNSR``, validated once, here.

``lnsr.LNSR``, ``LNSRTrainer``, the fine-tuning method and the command line all build one of these,
so an option means the same and fails the same way everywhere.  Checks that need the model (the
range of ``inject_at``, the length of ``layer_weights``) are here too, in ``resolve``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from . import ops
from .dropout import DROPOUT_MODES

NORMALIZE_MODES = ("token", "element", "gain")

# The options with a fixed set of values (argparse ``choices=``).
CHOICES = {"noise": ops.NOISE_KINDS, "normalize": NORMALIZE_MODES, "dropout": DROPOUT_MODES,
           "backend": ops.BACKENDS}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class LNSRConfig:
    """The options of ``lnsr.LNSR`` (see its docstring); invalid values raise on construction.

    Frozen: derive a variant with ``config.replace(lam=0.003)`` (validated again).
    """
    sigma: float = 0.05               # noise scale (relative: a fraction of each token's rms)
    noise: str = "relative"           # gaussian | relative | manifold
    inject_at: int = 0                # block k whose input gets the noise; negative counts from the top
    lam: float = 1.0                  # weight of the penalty: reg.loss = lam * P
    layer_weights: tuple | None = None  # one weight per regularised block (default 1 each)
    detach_clean: bool = False        # no gradient through the clean half of the penalty
    normalize: str = "token"          # token | element (/ width) | gain (scale-free)
    dropout: str = "paired"           # paired | independent | off, inside the regularised blocks
    n_anchors: int = ops.DEFAULT_ANCHORS  # manifold noise: tokens spanning the noise subspace
    blocks: Any = None                # None (found per model type), an attribute path, or a list of modules
    backend: str = "auto"             # auto | torch | triton | cuda | cpu (lnsr.ops.BACKENDS)
    check_finite: bool = True         # raise on NaN/Inf where the noise goes in (one host sync per step)
    every: int = 1                    # regularise one training forward in `every`
    noisy_fraction: float = 1.0       # share of the batch (its last rows) given a noisy copy
    rank: int | None = None           # folded into the noise seed; None: torch.distributed's rank
    add_to_loss: bool = False         # also add lam * P to the model's own outputs.loss

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise the stored values once, here
        if not _is_real(self.sigma):
            raise TypeError(f"sigma must be a float >= 0 (the noise scale), got {self.sigma!r}")
        if not math.isfinite(self.sigma) or self.sigma < 0:
            raise ValueError(f"sigma must be a finite float >= 0 (the noise scale), got {self.sigma!r}")
        set_(self, "sigma", float(self.sigma))
        for name in ("noise", "normalize", "dropout", "backend"):
            value = getattr(self, name)
            if value not in CHOICES[name]:
                raise ValueError(f"{name} must be one of {', '.join(CHOICES[name])}, got {value!r}")
        if not _is_int(self.inject_at):
            raise TypeError(f"inject_at must be an int (block index; negative counts from the top), "
                            f"got {self.inject_at!r}")
        if not _is_real(self.lam) or not math.isfinite(self.lam) or self.lam < 0:
            raise ValueError(f"lam must be a finite float >= 0 (the penalty's weight), got {self.lam!r}")
        set_(self, "lam", float(self.lam))
        if self.layer_weights is not None:
            if isinstance(self.layer_weights, (str, bytes)) or not hasattr(self.layer_weights, "__iter__"):
                raise TypeError(f"layer_weights must be a sequence of floats (one per regularised block) or None, "
                                f"got {self.layer_weights!r}")
            weights = tuple(self.layer_weights)
            if not all(_is_real(w) and math.isfinite(w) and w >= 0 for w in weights):
                raise ValueError(f"layer_weights must be finite floats >= 0, got {list(weights)}")
            set_(self, "layer_weights", tuple(float(w) for w in weights))
        for name in ("detach_clean", "check_finite", "add_to_loss"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not _is_int(self.n_anchors) or self.n_anchors < 1:
            raise ValueError(f"n_anchors must be a positive int, got {self.n_anchors!r}")
        if not _is_int(self.every) or self.every < 1:
            raise ValueError(f"every must be an int >= 1 (regularise one training forward in `every`), "
                             f"got {self.every!r}")
        if not _is_real(self.noisy_fraction) or not 0 < self.noisy_fraction <= 1:
            raise ValueError(f"noisy_fraction must be in (0, 1] (the share of the batch given a noisy copy), "
                             f"got {self.noisy_fraction!r}")
        set_(self, "noisy_fraction", float(self.noisy_fraction))
        if self.rank is not None and (not _is_int(self.rank) or self.rank < 0):
            raise ValueError(f"rank must be None (from torch.distributed) or an int >= 0, got {self.rank!r}")
        if self.blocks is not None and not isinstance(self.blocks, str) and not hasattr(self.blocks, "__iter__"):
            raise TypeError("blocks must be None, an attribute path such as 'encoder.layer', or a list of the "
                            "model's blocks (bottom first)")

    # -- building ------------------------------------------------------------------------------------
    @classmethod
    def make(cls, config: "LNSRConfig | Mapping | None" = None, **options) -> "LNSRConfig":
        """A config from a config (or a mapping of options) and/or keyword options, which override it."""
        if config is None:
            base = {}
        elif isinstance(config, LNSRConfig):
            if not options:
                return config
            base = config.to_dict()
        elif isinstance(config, Mapping):
            base = dict(config)
        else:
            raise TypeError(f"config must be an lnsr.LNSRConfig, a mapping of options or None, "
                            f"got {type(config).__name__}")
        merged = {**base, **options}
        unknown = sorted(set(merged) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; lnsr.LNSR takes {sorted(cls.names())}")
        return cls(**merged)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **options) -> "LNSRConfig":
        return LNSRConfig.make(self, **options)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.names()}

    # -- the checks that need the model -----------------------------------------------------------------
    def resolve(self, n_blocks: int) -> tuple[int, list[float]]:
        """``(k, weights)`` for a model with ``n_blocks`` blocks: ``inject_at`` as an index in
        ``0..n_blocks-1`` and one weight per regularised block ``k..n_blocks-1``."""
        if not -n_blocks <= self.inject_at < n_blocks:
            raise ValueError(f"inject_at={self.inject_at} is out of range for a model with {n_blocks} blocks: use "
                             f"0..{n_blocks - 1} (0 = the embeddings' output) or -{n_blocks}..-1")
        k = self.inject_at % n_blocks
        n_reg = n_blocks - k
        if self.layer_weights is None:
            return k, [1.0] * n_reg
        if len(self.layer_weights) != n_reg:
            raise ValueError(f"layer_weights needs one weight per regularised block ({n_reg} for inject_at={k} of "
                             f"{n_blocks}), got {len(self.layer_weights)}")
        return k, list(self.layer_weights)
