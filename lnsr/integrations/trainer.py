"""``LNSRTrainer``: Hugging Face ``Trainer`` with LNSR switched on by one argument.

    trainer = LNSRTrainer(model=model, args=args, train_dataset=..., lnsr=dict(lam=0.01, sigma=0.05))

The hooks are placed on the unwrapped model (``lnsr.LNSR`` unwraps DDP / torch.compile / PEFT)
when training begins and removed when it ends (also on an exception).  The training loss is the
task loss plus ``lam * P``; ``lnsr_penalty`` (mean P per forward), ``lnsr_loss`` (mean lam*P) and
``lnsr_ratio`` (the penalty term over the task loss) are logged next to ``loss``, averaged over the
forwards since the previous log.  Evaluation runs the model in eval mode, where LNSR does nothing.

Gradient accumulation: the per-micro-batch penalty is scaled exactly as the Trainer believes the
task loss is (``loss_is_scaled_for_ga``, else ``model_accepts_loss_kwargs`` and
``num_items_in_batch``), so that ``lam`` keeps its meaning; the term is ``lnsr.loss_share.penalty_term``,
the one rule ``lnsr.LNSR(add_to_loss=True)`` follows too.  Some models accept loss kwargs but
ignore ``num_items_in_batch`` (``BertForSequenceClassification`` in transformers 5.x): the plain
Trainer then sums their task loss over the micro-batches (the logged loss grows with the number of
accumulation steps); set ``trainer.loss_is_scaled_for_ga = False`` for such models, which fixes the
task loss and keeps the penalty consistent with it.
"""
from __future__ import annotations

from transformers import Trainer, TrainerCallback

from ..loss_share import penalty_term


class _AttachCallback(TrainerCallback):
    """Attach at ``on_train_begin`` (after ``model_init`` and wrapping), detach at ``on_train_end``."""

    def __init__(self, trainer: "LNSRTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._lnsr_attach()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._lnsr_detach()


class LNSRTrainer(Trainer):
    """``transformers.Trainer`` plus LNSR: ``lnsr=`` takes the options of ``lnsr.LNSR`` (an
    ``lnsr.LNSRConfig``, a dict, or any mapping / object with ``to_dict()``), validated here, before
    training; ``lnsr=None`` is the plain Trainer."""

    def __init__(self, *args, lnsr=None, **kwargs):
        from ..config import LNSRConfig

        if lnsr is not None and not isinstance(lnsr, (LNSRConfig, dict)) and hasattr(lnsr, "to_dict"):
            lnsr = lnsr.to_dict()
        try:
            self.lnsr_config = None if lnsr is None else LNSRConfig.make(lnsr)
        except TypeError as e:
            raise TypeError(f"lnsr= {e}") from None
        if self.lnsr_config is not None and self.lnsr_config.add_to_loss:
            raise ValueError("LNSRTrainer adds lam * P to the loss itself: drop add_to_loss from lnsr=, or attach "
                             "lnsr.LNSR(model, add_to_loss=True) and use the plain Trainer")
        self.lnsr_reg = None
        self._lnsr_sums = {"penalty": 0.0, "loss": 0.0, "task": 0.0, "term": 0.0, "n": 0}
        super().__init__(*args, **kwargs)
        if self.lnsr_config is not None:
            self.add_callback(_AttachCallback(self))

    @property
    def lnsr_kwargs(self) -> dict | None:
        """The options as keyword arguments of ``lnsr.LNSR`` (None without LNSR)."""
        return None if self.lnsr_config is None else self.lnsr_config.to_dict()

    # -- life cycle ----------------------------------------------------------------------------------
    def _lnsr_attach(self) -> None:
        import lnsr
        self._lnsr_detach()
        self.lnsr_reg = lnsr.LNSR(self.model, self.lnsr_config)
        self._lnsr_sums = {"penalty": 0.0, "loss": 0.0, "task": 0.0, "term": 0.0, "n": 0}

    def _lnsr_detach(self) -> None:
        if self.lnsr_reg is not None:
            self.lnsr_reg.remove()
            self.lnsr_reg = None

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self._lnsr_detach()  # also when training raises: the model is left as it was

    # -- loss ----------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        reg = self.lnsr_reg
        steps_before = reg.steps if reg is not None else None
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if reg is not None and reg.steps != steps_before:  # this forward was regularised (training mode)
            # When the task loss is already normalised over the whole accumulated batch (num_items_in_batch),
            # the Trainer no longer divides by the accumulation steps: scale the per-batch penalty ourselves,
            # so that both terms enter the update with the same weight as without accumulation.
            term = penalty_term(reg.loss, normalized=self._lnsr_loss_scaled_for_ga(num_items_in_batch),
                                accumulation_steps=getattr(self, "current_gradient_accumulation_steps", 1))
            s = self._lnsr_sums
            s["penalty"] += float(reg.penalty)
            s["loss"] += float(reg.loss.detach())
            s["task"] += float(loss.detach())
            s["term"] += float(term.detach())
            s["n"] += 1
            loss = loss + term
        return (loss, outputs) if return_outputs else loss

    def _lnsr_loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    # -- logging -------------------------------------------------------------------------------------
    def log(self, logs, *args, **kwargs):
        s = self._lnsr_sums
        if "loss" in logs and s["n"]:
            logs["lnsr_penalty"] = s["penalty"] / s["n"]
            logs["lnsr_loss"] = s["loss"] / s["n"]
            # the penalty term over the task term, as both entered the training loss
            logs["lnsr_ratio"] = s["term"] / s["task"] if s["task"] else float("nan")
            self._lnsr_sums = {"penalty": 0.0, "loss": 0.0, "task": 0.0, "term": 0.0, "n": 0}
        return super().log(logs, *args, **kwargs)


__all__ = ["LNSRTrainer"]
