"""Fine-tuning methods: a registry; vanilla and lnsr here, the papers' baselines in ``baselines.py``.

A method is a class registered under a name.  ``OPTIONS`` lists the command-line options it reads
(their values go into the run's config, so a changed option re-runs and an unrelated one does not).
Per run the runner calls ``attach(model)`` once before training, ``extra_loss(model, batch,
outputs)`` after each training forward (return a tensor added to the task loss, or None) and
``detach()`` at the end; ``stats()`` gives the numbers of the latest step to log.

A method spec on the command line is ``name`` or ``name:key=value,key=value`` (e.g.
``lnsr:lam=0.003``) to override options for that method only; its results go to a folder named
after the spec (``lnsr_lam0.003``).
"""
from __future__ import annotations

import torch

METHODS: dict[str, type] = {}


def register_method(name: str):
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


class Method:
    name = "base"
    OPTIONS: dict[str, type] = {}   # option -> type, settable as name:key=value
    DEFAULTS: dict = {}             # the method's own default for each option
    FROM_CLI: tuple = ()            # options whose default comes from a shared command-line flag (--lam, ...)

    def __init__(self, **options):
        self.options = options

    @classmethod
    def validate(cls, label: str, options: dict) -> None:
        """Raise SystemExit for bad option values (runs before any training)."""

    def attach(self, model: torch.nn.Module) -> None:
        pass

    def extra_loss(self, model, batch, outputs):
        return None

    def stats(self) -> dict:
        return {}

    def detach(self) -> None:
        pass


@register_method("vanilla")
class Vanilla(Method):
    """Plain fine-tuning: the task loss only."""


@register_method("lnsr")
class LNSRMethod(Method):
    """Layerwise Noise Stability Regularization (``lnsr.LNSR``) on the model's blocks."""
    OPTIONS = {"sigma": float, "noise": str, "inject_at": int, "lam": float, "normalize": str,
               "dropout": str, "detach_clean": bool, "backend": str}
    FROM_CLI = tuple(OPTIONS)

    @classmethod
    def validate(cls, label, options):
        if not (options.get("sigma", 0) >= 0 and options.get("lam", 0) >= 0):
            raise SystemExit(f"method {label}: sigma and lam must be >= 0, got sigma={options.get('sigma')} "
                             f"lam={options.get('lam')}")

    def attach(self, model):
        import lnsr
        self.reg = lnsr.LNSR(model, **self.options)

    def extra_loss(self, model, batch, outputs):
        return self.reg.loss

    def stats(self):
        reg = self.reg
        if reg.penalty is None:
            return {}
        return {"penalty": float(reg.penalty), "reg_loss": float(reg.loss.detach())}

    def detach(self):
        if getattr(self, "reg", None) is not None:
            self.reg.remove()
            self.reg = None


def _convert(typ, raw: str):
    if typ is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    return typ(raw)


def parse_method_spec(spec: str, defaults: dict) -> tuple[str, str, dict]:
    """``(label, name, options)`` of ``name`` or ``name:k=v,k=v``; options start from the method's
    ``DEFAULTS``, then ``defaults`` (the command line's flags) for its ``FROM_CLI`` options."""
    name, _, rest = spec.partition(":")
    if name not in METHODS:
        raise SystemExit(f"unknown method {name!r}: choose from {', '.join(METHODS)} "
                         f"(register more with lnsr.finetune.register_method)")
    cls = METHODS[name]
    options = dict(cls.DEFAULTS)
    options.update({k: defaults[k] for k in cls.FROM_CLI if k in defaults})
    label = name
    if rest:
        parts = []
        for item in rest.split(","):
            key, eq, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or key not in cls.OPTIONS:
                raise SystemExit(f"bad method spec {spec!r}: expected {name}:key=value[,key=value] with keys "
                                 f"from {', '.join(cls.OPTIONS) or '(none)'}")
            try:
                options[key] = _convert(cls.OPTIONS[key], raw.strip())
            except ValueError:
                raise SystemExit(f"bad method spec {spec!r}: {key}={raw!r} is not a "
                                 f"{cls.OPTIONS[key].__name__}") from None
            parts.append(f"{key}{raw.strip()}")
        label = name + "_" + "_".join(parts)
    cls.validate(label, options)
    return label, name, options
