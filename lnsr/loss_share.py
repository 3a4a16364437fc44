"""The penalty's term in a training loss under gradient accumulation, decided in one place.

``lnsr.LNSR(model, add_to_loss=True)`` adds ``penalty_term(...)`` to the loss the model computes;
``LNSRTrainer.compute_loss`` (and so ``LNSRSFTTrainer``, its subclass) adds ``penalty_term(...)``
to the loss the Trainer computes.  The rule: ``lam * P`` enters the loss of a micro-batch with the
weight its task loss has, so that ``lam`` means the same with and without accumulation.

- The task loss is a mean over the micro-batch and the caller divides the summed loss by the
  accumulation steps itself (no ``num_items_in_batch``): ``lam * P`` as it is (the caller's
  division applies to it too).
- The task loss is already normalised over the whole accumulated batch (the Hugging Face Trainer
  passes ``num_items_in_batch``, the label items of all the micro-batches, and no longer divides
  by the steps): ``lam * P`` times the micro-batch's share of those items, ``n /
  num_items_in_batch`` when its own count ``n`` is known (``add_to_loss``: ``label_items`` of the
  call's labels), else ``1 / accumulation_steps`` (``LNSRTrainer``: equal micro-batches).
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the label of a token that has no loss (transformers' and torch's convention)


def penalty_term(loss: torch.Tensor, *, num_items_in_batch=None, items=None, accumulation_steps=1,
                 normalized: bool | None = None) -> torch.Tensor:
    """The term to add to one micro-batch's task loss for the penalty ``loss`` (``lam * P``).

    ``normalized``: whether the task loss is already normalised over the accumulated batch (the
    caller does not divide by the steps); None: whether ``num_items_in_batch`` was given.  Not
    normalised: ``loss``.  Normalised: ``loss * items / max(num_items_in_batch, 1)`` when both
    counts are given (``items``, the micro-batch's label items, e.g. from ``label_items``; tensors
    or numbers), else ``loss / accumulation_steps``.  The weight carries no gradient.
    """
    if normalized is None:
        normalized = num_items_in_batch is not None
    if not normalized:
        return loss
    if items is not None and num_items_in_batch is not None:
        n = torch.as_tensor(items, device=None if isinstance(items, torch.Tensor) else loss.device)
        n = n.to(torch.float32)
        total = torch.as_tensor(num_items_in_batch, device=n.device).to(torch.float32).reshape(-1)[0]
        return loss * (n / total.clamp_min(1.0)).detach()
    steps = max(1, accumulation_steps or 1)
    return loss if steps == 1 else loss / steps


def label_items(labels, shift_labels=None, *, shifts: bool = False) -> torch.Tensor | None:
    """The label items of a micro-batch as the Trainer counts them (labels != -100, as fp32):
    ``shift_labels`` when given, else ``labels`` (``labels[..., 1:]`` when ``shifts``: a causal
    LM's shifted loss, ``loss_shifts_labels``); None without a label tensor."""
    if shift_labels is not None:
        labels = shift_labels
    elif shifts and isinstance(labels, torch.Tensor):
        labels = labels[..., 1:]
    if not isinstance(labels, torch.Tensor):
        return None
    return labels.ne(IGNORE_INDEX).sum().to(torch.float32)


def loss_shifts_labels(model) -> bool:
    """Whether the model's loss shifts labels (a causal LM), by the rule the Trainer counts items with."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except Exception:  # no transformers (or an older layout): count labels as they are
        return False
    return (LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
            and not getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def add_to_output_loss(output, loss: torch.Tensor, **share) -> bool:
    """``output["loss"] += penalty_term(loss, **share)`` when the model computed a loss (a
    ``ModelOutput`` or a dict with a tensor ``"loss"``; a tuple's loss cannot be told apart).
    Returns whether it was added."""
    if not isinstance(output, dict):  # ModelOutput is a dict
        return False
    task = output.get("loss")
    if not isinstance(task, torch.Tensor):
        return False
    output["loss"] = task + penalty_term(loss, **share)  # also sets .loss
    return True
