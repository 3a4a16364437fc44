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

    def state_dict(self) -> dict:
        """What the method carries between steps beyond the model (saved in run checkpoints)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def detach(self) -> None:
        pass


@register_method("vanilla")
class Vanilla(Method):
    """Plain fine-tuning: the task loss only."""


@register_method("lnsr")
class LNSRMethod(Method):
    """Layerwise Noise Stability Regularization (``lnsr.LNSR``) on the model's blocks."""
    OPTIONS = {"sigma": float, "noise": str, "inject_at": int, "lam": float, "normalize": str,
               "dropout": str, "detach_clean": bool, "backend": str, "noisy_fraction": float, "every": int}
    # the schedules (noisy_fraction, every) have no shared flag: set per spec, absent = lnsr.LNSR's default
    FROM_CLI = ("sigma", "noise", "inject_at", "lam", "normalize", "dropout", "detach_clean", "backend")

    @classmethod
    def validate(cls, label, options):
        from ..config import LNSRConfig  # the one place LNSR's options are checked
        try:
            LNSRConfig(**options)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"method {label}: {exc}") from None

    def attach(self, model):
        import lnsr
        self.reg = lnsr.LNSR(model, **self.options)

    def extra_loss(self, model, batch, outputs):
        return self.reg.loss

    def stats(self):
        reg = self.reg
        # only forwards that were regularised count (`every` > 1 skips some; penalty is then the old tensor)
        if reg.penalty is None or reg.penalty is getattr(self, "_seen", None):
            return {}
        self._seen = reg.penalty
        return {"penalty": float(reg.penalty), "reg_loss": float(reg.loss.detach())}

    def state_dict(self):
        # the count of training forwards decides which forwards `every` regularises
        return {"training_forwards": self.reg.training_forwards}

    def load_state_dict(self, state):
        self.reg.training_forwards = state["training_forwards"]

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


def _options_from_file(name: str, path: str, spec: str) -> tuple[str, dict]:
    """``(label, options)`` stored by ``lnsr tune`` (its ``best.json``) for method ``name``."""
    import json
    import os

    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise SystemExit(f"bad method spec {spec!r}: cannot read {path!r} ({exc.strerror}); expected the JSON "
                         f"that `lnsr tune` writes (best.json)") from None
    except ValueError as exc:
        raise SystemExit(f"bad method spec {spec!r}: {path} is not JSON ({exc})") from None
    best = data.get("best") if isinstance(data, dict) else None
    if not isinstance(best, dict) or not isinstance(best.get("options"), dict):
        raise SystemExit(f"bad method spec {spec!r}: {path} has no 'best' entry with 'options'; is it the best.json "
                         f"of `lnsr tune`?")
    if best.get("method") != name:
        raise SystemExit(f"bad method spec {spec!r}: {path} holds options of method {best.get('method')!r}, "
                         f"not {name!r}")
    unknown = [k for k in best["options"] if k not in METHODS[name].OPTIONS]
    if unknown:
        raise SystemExit(f"bad method spec {spec!r}: {path} has unknown {name} option(s) {unknown}")
    label = best.get("label") or f"{name}_{os.path.splitext(os.path.basename(path))[0]}"
    return str(label), dict(best["options"])


def parse_method_spec(spec: str, defaults: dict) -> tuple[str, str, dict]:
    """``(label, name, options)`` of ``name``, ``name:k=v,k=v`` or ``name:@best.json`` (the options
    ``lnsr tune`` chose); options start from the method's ``DEFAULTS``, then ``defaults`` (the command
    line's flags) for its ``FROM_CLI`` options, then the spec's own."""
    name, _, rest = spec.partition(":")
    if name not in METHODS:
        raise SystemExit(f"unknown method {name!r}: choose from {', '.join(METHODS)} "
                         f"(register more with lnsr.finetune.register_method)")
    cls = METHODS[name]
    options = dict(cls.DEFAULTS)
    options.update({k: defaults[k] for k in cls.FROM_CLI if k in defaults})
    label = name
    if rest.startswith("@"):  # name:@best.json[,key=value,...]: the tuned options, then overrides
        path, _, rest = rest[1:].partition(",")
        label, chosen = _options_from_file(name, path, spec)
        for key, value in chosen.items():
            try:
                options[key] = value if isinstance(value, cls.OPTIONS[key]) else _convert(cls.OPTIONS[key], str(value))
            except ValueError:
                raise SystemExit(f"{path}: option {key}={value!r} is not a {cls.OPTIONS[key].__name__}") from None
        if not rest:
            cls.validate(label, options)
            return label, name, options
        label_head = label
    else:
        label_head = name
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
        label = label_head + "_" + "_".join(parts)
    cls.validate(label, options)
    return label, name, options
