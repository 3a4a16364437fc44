"""What dropout does inside the regularised blocks during a regularised forward (docs/design.md §1).

``paired``: every ``nn.Dropout`` in blocks >= k draws one mask for the clean half and applies it
to both halves; attention-probability dropout, which attention code applies itself after reading
``module.dropout.p`` or a float attribute such as ``attention_dropout`` (SDPA cannot pair masks),
reads 0.  ``off``: every dropout there reads 0.  ``independent``: nothing changes.

The zeroed values stay in force from the start of a regularised forward to the start of the next
forward (or ``remove()``), so that an activation-checkpoint recomputation during backward sees
the same dropout as the forward did; checkpointing restores the RNG state, so paired masks are
redrawn identically.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

DROPOUT_MODES = ("paired", "independent", "off")


class DropoutControl:
    def __init__(self, blocks: list[nn.Module], mode: str, batch_of_clean_half):
        # mode was validated by LNSRConfig
        self.mode = mode
        self._clean_batch = batch_of_clean_half  # callable -> (B, m) of the running regularised forward, or None
        self.dropouts = []
        self.float_attrs = []
        seen = set()
        for block in blocks:
            for mod in block.modules():
                if id(mod) in seen:
                    continue
                seen.add(id(mod))
                if isinstance(mod, nn.modules.dropout._DropoutNd):
                    self.dropouts.append(mod)
                for name, value in vars(mod).items():
                    if "dropout" in name.lower() and isinstance(value, float):
                        self.float_attrs.append((mod, name))
        self._saved_p: dict[int, float] | None = None
        self._saved_floats: list[float] | None = None
        self._installed = []

    @property
    def active(self) -> bool:
        return self._saved_p is not None

    def install(self) -> None:
        if self.mode != "paired":
            return
        for mod in self.dropouts:
            if type(mod) is nn.Dropout:
                # An instance attribute shadows the class's forward; removed again by uninstall().
                mod.forward = _PairedForward(mod, self)
                self._installed.append(mod)

    def uninstall(self) -> None:
        self.deactivate()
        for mod in self._installed:
            mod.__dict__.pop("forward", None)
        self._installed = []

    def activate(self) -> None:
        """Zero the probabilities that cannot be paired (all of them for ``off``)."""
        if self.mode == "independent" or self.active:
            return
        self._saved_p = {id(m): m.p for m in self.dropouts}
        self._saved_floats = [getattr(m, n) for m, n in self.float_attrs]
        for m in self.dropouts:
            m.p = 0.0
        for m, n in self.float_attrs:
            setattr(m, n, 0.0)

    def deactivate(self) -> None:
        if not self.active:
            return
        for m in self.dropouts:
            m.p = self._saved_p[id(m)]
        for (m, n), v in zip(self.float_attrs, self._saved_floats):
            setattr(m, n, v)
        self._saved_p = None
        self._saved_floats = None

    def paired_p(self, mod: nn.Module) -> float | None:
        """The real probability of ``mod`` while a regularised forward is in force, else None."""
        return None if self._saved_p is None else self._saved_p[id(mod)]


class _PairedForward:
    """``nn.Dropout.forward`` that applies one mask to both halves of a doubled batch."""

    def __init__(self, mod: nn.Dropout, control: DropoutControl):
        self.mod = mod
        self.control = control

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mod = self.mod
        p = self.control.paired_p(mod)
        if p is None:
            return nn.Dropout.forward(mod, x)
        if not mod.training or p == 0.0:
            return x
        split = self.control._clean_batch()
        if split is None or x.dim() == 0 or x.shape[0] != split[0] + split[1]:
            return F.dropout(x, p, True)  # not a doubled tensor: ordinary dropout
        b, m = split
        keep = torch.empty_like(x[:b]).bernoulli_(1.0 - p).div_(1.0 - p)
        if m == b:
            return (x.view(2, *x[:b].shape) * keep).view(x.shape)
        return x * torch.cat([keep, keep[b - m:]], dim=0)  # noisy rows reuse their clean row's mask
