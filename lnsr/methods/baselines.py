"""The papers' baselines: L2-SP, Mixout, R3F and SMART, as registered methods (``lnsr.methods``).

Each keeps to its reference formulation and its authors' default numbers (cited per class); every
number is a ``name:key=value`` option on the command line (e.g. ``--method r3f:lam=0.5``).  They act
on the *pretrained* part of a ``*ForSequenceClassification`` model (``model.base_model``), never on
the new head, and leave the model exactly as they found it after ``detach()``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..models import find_blocks, replace_block_input, unwrap
from .registry import Method, register_method


def _pretrained_part(model: nn.Module) -> nn.Module:
    """The encoder whose weights came from the checkpoint (``base_model``); the head is new."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        raise ValueError(f"{type(model).__name__} has no pretrained base_model separate from its head: the baselines "
                         f"need a Hugging Face *ForSequenceClassification model")
    return base


def _is_regression(logits: torch.Tensor) -> bool:
    return logits.shape[-1] == 1


def output_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Symmetric KL between the class distributions of logits ``a`` and ``b`` (summed over classes, mean
    over the batch), computed in fp32; the squared difference for regression outputs (one column)."""
    a, b = a.float(), b.float()
    if _is_regression(a):
        return F.mse_loss(a, b)
    la, lb = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
    return ((la.exp() - lb.exp()) * (la - lb)).sum(-1).mean()  # KL(p||q) + KL(q||p)


def _without(batch: dict, *keys: str) -> dict:
    """The model inputs of ``batch`` less ``keys`` (labels: no task loss in the extra forwards)."""
    return {k: v for k, v in batch.items() if k not in keys}


def _check_nonneg(label: str, **values):
    for k, v in values.items():
        if not v >= 0:  # also rejects NaN
            raise SystemExit(f"method {label}: {k} must be >= 0, got {v}")


class _PenaltyMethod(Method):
    """A method whose ``extra_loss`` records ``(penalty, reg_loss)`` of the step in ``_last`` for ``stats``."""
    _last = None

    def stats(self):
        return {} if self._last is None else {"penalty": self._last[0], "reg_loss": self._last[1]}


@register_method("l2sp")
class L2SP(_PenaltyMethod):
    """L2-SP (Li, Grandvalet & Davoine, ICML 2018): ``alpha/2 * ||w - w0||^2`` over the pretrained weights
    (``w0`` = their values when training starts) plus ``beta/2 * ||w_head||^2`` over the new head; the
    paper's alpha 0.1, beta 0.01.  (AdamW's weight decay still applies on top; pass --weight-decay 0 for
    the paper's setting.)"""
    OPTIONS = {"alpha": float, "beta": float}
    DEFAULTS = {"alpha": 0.1, "beta": 0.01}

    @classmethod
    def validate(cls, label, options):
        _check_nonneg(label, alpha=options["alpha"], beta=options["beta"])

    def attach(self, model):
        base = _pretrained_part(model)
        pre = {id(p) for p in base.parameters()}
        self.params = [p for p in base.parameters() if p.requires_grad]
        self.start = [p.detach().clone() for p in self.params]
        self.head = [p for p in model.parameters() if p.requires_grad and id(p) not in pre]

    def extra_loss(self, model, batch, outputs):
        o = self.options
        sp = sum(((p - p0) ** 2).sum() for p, p0 in zip(self.params, self.start))
        head = sum((p ** 2).sum() for p in self.head) if self.head else sp.new_zeros(())
        loss = o["alpha"] / 2 * sp + o["beta"] / 2 * head
        self._last = (float(sp.detach()), float(loss.detach()))
        return loss

    def detach(self):
        self.params = self.start = self.head = []


class _MixoutWeight(nn.Module):
    """The parametrization ``w -> w0 + mask * (w - w0) / (1 - p)``, ``mask ~ Bernoulli(1 - p)`` per element:
    each weight is swapped for its pretrained value with probability p, rescaled so the expectation is w."""

    def __init__(self, target: torch.Tensor, p: float):
        super().__init__()
        self.register_buffer("target", target, persistent=False)
        self.p = p

    def forward(self, w):
        if not self.training or self.p == 0:
            return w
        mask = torch.empty_like(w).bernoulli_(1 - self.p)
        return self.target + (w - self.target) * mask / (1 - self.p)


@register_method("mixout")
class Mixout(Method):
    """Mixout (Lee, Cho & Kang, ICLR 2020): in training, every weight of the pretrained part's
    ``nn.Linear`` layers is replaced by its pretrained value with probability p (rescaled, mask drawn per
    forward).  The model's dropout stays as it is; p 0.1 by default (the paper sweeps 0.1-0.9)."""
    OPTIONS = {"p": float}
    DEFAULTS = {"p": 0.1}

    @classmethod
    def validate(cls, label, options):
        if not 0 <= options["p"] < 1:
            raise SystemExit(f"method {label}: p must be in [0, 1), got {options['p']}")

    def attach(self, model):
        self.layers = [m for m in _pretrained_part(model).modules() if isinstance(m, nn.Linear)]
        if not self.layers:
            raise ValueError(f"mixout: {type(model).__name__}'s pretrained part has no nn.Linear layers")
        self._order = [list(lin._parameters) for lin in self.layers]
        for lin in self.layers:  # the Parameter itself stays (as .original): the optimizer keeps updating it
            parametrize.register_parametrization(lin, "weight", _MixoutWeight(lin.weight.detach().clone(),
                                                                                self.options["p"]))

    def detach(self):
        for lin, order in zip(getattr(self, "layers", []), getattr(self, "_order", [])):
            if parametrize.is_parametrized(lin, "weight"):
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
                # removal re-adds the weight last; restore the order so state_dict / parameters() read as before
                params = lin._parameters
                lin._parameters = type(params)((k, params[k]) for k in order if k in params)
        self.layers = []


@register_method("r3f")
class R3F(_PenaltyMethod):
    """R3F (Aghajanyan et al., ICLR 2021): ``lam * symKL(f(x), f(x + z))`` with ``z`` uniform in
    ``[-eps, eps]`` (or normal with std eps) added to the token embeddings (``inputs_embeds``); one more
    forward per step.  fairseq's defaults: lam 1, eps 1e-5, uniform noise."""
    OPTIONS = {"lam": float, "eps": float, "noise_type": str}
    DEFAULTS = {"lam": 1.0, "eps": 1e-5, "noise_type": "uniform"}

    @classmethod
    def validate(cls, label, options):
        _check_nonneg(label, lam=options["lam"], eps=options["eps"])
        if options["noise_type"] not in ("uniform", "normal"):
            raise SystemExit(f"method {label}: noise_type must be uniform or normal, got {options['noise_type']!r}")

    def attach(self, model):
        self.embed = model.get_input_embeddings()

    def extra_loss(self, model, batch, outputs):
        o = self.options
        emb = self.embed(batch["input_ids"])
        if o["noise_type"] == "uniform":
            z = torch.empty_like(emb).uniform_(-o["eps"], o["eps"])
        else:
            z = torch.randn_like(emb) * o["eps"]
        noisy = model(**_without(batch, "input_ids", "labels"), inputs_embeds=emb + z).logits
        div = output_divergence(noisy, outputs.logits)
        self._last = (float(div.detach()), o["lam"] * float(div.detach()))
        return o["lam"] * div


@register_method("smart")
class SMART(_PenaltyMethod):
    """SMART (Jiang et al., ACL 2020), both parts.

    Smoothness-inducing adversarial regulariser, as in the authors' mt-dnn code: noise
    ``delta ~ N(0, sigma^2)`` on the first block's input (the embeddings' output), ``steps`` ascent steps
    ``delta <- normalise(delta + step_size * grad symKL(f(x + delta), f(x)))`` with the per-token inf-norm,
    then ``lam * symKL(f(x), f(x + delta))``.
    Bregman proximal point with momentum: ``mu * symKL(f(x), f_teacher(x))`` where the teacher holds the
    moving average ``theta~ <- beta * theta~ + (1 - beta) * theta`` of the weights (a copy of the model,
    in eval mode); ``mu = 0`` turns it off (no copy).
    The paper's numbers: lam 1, sigma 1e-5, step_size 1e-3, 1 step, mu 1, beta 0.99."""
    OPTIONS = {"lam": float, "sigma": float, "step_size": float, "steps": int, "mu": float, "beta": float}
    DEFAULTS = {"lam": 1.0, "sigma": 1e-5, "step_size": 1e-3, "steps": 1, "mu": 1.0, "beta": 0.99}
    NORM_EPS = 1e-6

    @classmethod
    def validate(cls, label, options):
        _check_nonneg(label, lam=options["lam"], sigma=options["sigma"], step_size=options["step_size"],
                      mu=options["mu"])
        if options["steps"] < 1:
            raise SystemExit(f"method {label}: steps must be >= 1, got {options['steps']}")
        if not 0 <= options["beta"] < 1:
            raise SystemExit(f"method {label}: beta must be in [0, 1), got {options['beta']}")

    def attach(self, model):
        import copy

        self.hidden = getattr(model.config, "hidden_size", None)
        if self.hidden is None:
            raise ValueError(f"smart: {type(model).__name__}'s config has no hidden_size (the width of the first "
                             f"block's input, which the noise needs)")
        blocks, _ = find_blocks(unwrap(model)[1])
        self.delta = None
        self.teacher = None
        if self.options["mu"] > 0:  # copied before our hook goes on, so the teacher never sees the noise
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
            self._pairs = [(t, p) for t, p in zip(self.teacher.parameters(), model.parameters())]
        self._handle = blocks[0].register_forward_pre_hook(self._add_delta, with_kwargs=True)

    def _add_delta(self, module, args, kwargs):
        if self.delta is None:
            return None
        return replace_block_input(args, kwargs, lambda h: h + self.delta.to(h.dtype), who="smart: the first block")

    def _perturbed(self, model, batch, delta):
        self.delta = delta
        try:
            return model(**_without(batch, "labels")).logits
        finally:
            self.delta = None

    def extra_loss(self, model, batch, outputs):
        o = self.options
        logits = outputs.logits
        delta = (torch.randn(*batch["input_ids"].shape, self.hidden, device=logits.device) * o["sigma"]).requires_grad_()
        for _ in range(o["steps"]):
            adv = self._perturbed(model, batch, delta)
            grad, = torch.autograd.grad(output_divergence(adv, logits.detach()), delta)
            if not torch.isfinite(grad).all():
                self._last = None
                return None  # as the authors' code: skip the regulariser for this step
            step = delta.detach() + o["step_size"] * grad
            delta = (step / (step.abs().amax(-1, keepdim=True) + self.NORM_EPS)).requires_grad_()
        div = output_divergence(self._perturbed(model, batch, delta.detach()), logits)
        loss = o["lam"] * div
        if self.teacher is not None:
            with torch.no_grad():  # the weights now hold the previous step's update: fold it into the average
                teacher_params, params = zip(*self._pairs)
                torch._foreach_lerp_(list(teacher_params), [p.detach() for p in params], 1 - o["beta"])
                target = self.teacher(**_without(batch, "labels")).logits
            loss = loss + o["mu"] * output_divergence(logits, target)
        self._last = (float(div.detach()), float(loss.detach()))
        return loss

    def state_dict(self):
        # the moving-average teacher is the only state beyond the model (run checkpoints save it)
        return {} if self.teacher is None else {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state):
        if self.teacher is not None and "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])

    def detach(self):
        if getattr(self, "_handle", None) is not None:
            self._handle.remove()
            self._handle = None
        self.teacher, self._pairs = None, []
