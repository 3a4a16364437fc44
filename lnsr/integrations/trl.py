"""``LNSRSFTTrainer``: TRL's ``SFTTrainer`` with LNSR switched on by one argument.

    from lnsr.integrations import LNSRSFTTrainer
    trainer = LNSRSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=tok,
                             peft_config=LoraConfig(...), lnsr=dict(lam=0.01, sigma=0.05))

Why a subclass: ``lnsr.LNSR(model, add_to_loss=True)`` adds ``lam * P`` to ``outputs.loss``, but
``SFTTrainer.compute_loss`` (TRL 1.x) never reads it: it calls ``model(**inputs,
fused_lm_head=True)`` (a forward TRL patches onto the model: backbone, then a chunked LM head that
returns per-token ``log_probs`` without building the logits) and takes ``-log_probs.sum() /
num_items_in_batch`` (the label count of the micro-batch without it) as the loss, or runs
``compute_loss_func`` / the label smoother on a plain forward; it then logs ``entropy`` and
``mean_token_accuracy``.

``LNSRSFTTrainer`` is ``LNSRTrainer`` stacked on ``SFTTrainer`` (``class LNSRSFTTrainer(LNSRTrainer,
SFTTrainer)`` through the method resolution order), so everything is ``LNSRTrainer``'s, not a copy:
``lnsr=`` is validated the same way, the hooks go on the (PEFT-unwrapped) model at
``on_train_begin`` and come off at the end, ``LNSRTrainer.compute_loss`` adds ``reg.loss`` to the
loss ``SFTTrainer.compute_loss`` returned, weighted under gradient accumulation by the one rule
``lnsr.loss_share.penalty_term`` (with ``num_items_in_batch`` the SFT loss is already normalised
over the accumulated batch and the Trainer does not divide by the steps, so the penalty is divided
by the accumulation steps; ``LNSRTrainer._lnsr_loss_scaled_for_ga`` decides it as the Trainer
does), and ``lnsr_penalty`` / ``lnsr_loss`` / ``lnsr_ratio`` are logged next to TRL's metrics.

One adapter sits in between: ``LNSRTrainer.compute_loss`` asks the trainer below for ``(loss,
outputs)``, which ``SFTTrainer`` answers with a second, gradient-free forward for the logits (and a
FutureWarning); that forward would also reset ``reg.loss`` to zero before it is added.  The adapter
asks ``SFTTrainer`` for the outputs only when the caller of ``compute_loss`` wants them (evaluation
with logits), and keeps the regularised forward's ``reg.loss`` when a training caller does.

Importing this module needs ``trl`` (``pip install lnsr[trl]``); ``lnsr`` itself does not.
"""
from __future__ import annotations

import torch

try:
    from trl import SFTTrainer
except ImportError as e:  # pragma: no cover - exercised only without trl
    raise ImportError("lnsr.integrations.LNSRSFTTrainer needs TRL: pip install 'trl>=1.0' "
                      "(or pip install 'lnsr[trl]')") from e

from .trainer import LNSRTrainer


class _SFTLossOnDemand(SFTTrainer):
    """``SFTTrainer`` whose ``compute_loss`` builds the logits only when ``LNSRSFTTrainer``'s caller
    asked for them; ``(loss, None)`` when only ``LNSRTrainer.compute_loss`` did."""

    _lnsr_wants_outputs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        want = return_outputs and self._lnsr_wants_outputs
        reg = getattr(self, "lnsr_reg", None)
        if not want or reg is None or not (model.training and torch.is_grad_enabled()):
            out = super().compute_loss(model, inputs, return_outputs=want, num_items_in_batch=num_items_in_batch)
            return out if want or not return_outputs else (out, None)
        # A training caller wants the outputs: the regularised forward first, then the logits-only
        # forward TRL would run (under no_grad, so LNSR leaves it alone but zeroes reg.loss): keep the term.
        loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
        term = reg.loss
        with torch.no_grad():
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        reg.loss = term
        return loss, outputs


class LNSRSFTTrainer(LNSRTrainer, _SFTLossOnDemand):
    """``trl.SFTTrainer`` plus LNSR: ``lnsr=`` takes the options of ``lnsr.LNSR`` (an
    ``lnsr.LNSRConfig``, a dict, or any object with ``to_dict()``); ``lnsr=None`` is the plain
    ``SFTTrainer``.  Every other argument is ``SFTTrainer``'s (``peft_config=`` included)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._lnsr_wants_outputs = return_outputs
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._lnsr_wants_outputs = False


__all__ = ["LNSRSFTTrainer"]
