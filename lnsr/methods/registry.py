"""Fine-tuning methods: the registry; vanilla and lnsr here, the papers' baselines in ``baselines.py``.

A method is a class registered under a name (``register_method``): ``lnsr finetune``/``lnsr tune``
(``lnsr.finetune``) and the step benchmark (``lnsr.benchmarks.step``) look it up in ``METHODS``.
Another package's method registers the same way from its own module, imported before use (there
is no entry point).  ``OPTIONS`` lists the command-line options it reads (their values go into the
run's config, so a changed option re-runs and an unrelated one does not; ``lnsr``'s are read off
``lnsr.LNSRConfig``'s schema).
Per run the runner calls ``attach(model)`` once before training, ``extra_loss(model, batch,
outputs)`` after each training forward (return a tensor added to the task loss, or None) and
``detach()`` at the end; ``stats()`` gives the numbers of the latest step to log.

A method spec on the command line is ``name`` or ``name:key=value,key=value`` (e.g.
``lnsr:lam=0.003``) to override options for that method only; its results go to a folder named
after the spec (``lnsr_lam0.003``).
"""
from __future__ import annotations

import torch

from ..config import _FALSE, _TRUE, LNSRConfig

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
    def spec_keys(cls) -> tuple:
        """The options settable as ``name:key=value``."""
        return tuple(cls.OPTIONS)

    @classmethod
    def parse_option(cls, key: str, raw: str):
        """The typed value of option ``key`` from spec text; ValueError (one line) if it is not one."""
        typ = cls.OPTIONS[key]
        try:
            return _convert(typ, raw)
        except ValueError:
            raise ValueError(f"{key}={raw!r} is not a {typ.__name__}") from None

    @classmethod
    def options_from_json(cls, options: dict) -> dict:
        """The options a best.json stored (JSON values), typed; ValueError (one line) if one is bad."""
        unknown = [k for k in options if k not in cls.OPTIONS]
        if unknown:
            raise ValueError(f"unknown {cls.name} option(s) {unknown}; the options are {', '.join(cls.OPTIONS)}")
        return {k: v if isinstance(v, cls.OPTIONS[k]) else cls.parse_option(k, str(v)) for k, v in options.items()}

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
    """Layerwise Noise Stability Regularization (``lnsr.LNSR``) on the model's blocks.

    Its options, their types and checks are ``lnsr.LNSRConfig``'s schema: the spec keys are its
    ``spec`` options, the shared flags its ``cli`` ones (the schedules ``every`` and
    ``noisy_fraction`` have no flag: set per spec, absent = lnsr.LNSR's default)."""
    # read off the schema (kept as attributes for code that reads them)
    OPTIONS = {o.name: o.type for o in LNSRConfig.schema().values() if o.spec}
    FROM_CLI = LNSRConfig.cli_names()

    @classmethod
    def parse_option(cls, key, raw):
        return LNSRConfig.parse_value(key, raw)

    @classmethod
    def options_from_json(cls, options):
        unknown = [k for k in options if k not in cls.OPTIONS]
        if unknown:
            raise ValueError(f"unknown lnsr option(s) {unknown}; the options are {', '.join(cls.OPTIONS)}")
        config = LNSRConfig.from_json(options)
        return {k: getattr(config, k) for k in options}  # only those it stored: the run's config is the same

    @classmethod
    def validate(cls, label, options):
        try:  # LNSRConfig: the one place LNSR's options are checked
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
    if typ is bool:  # the words LNSRConfig.parse_value takes, for every method alike
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
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
    try:
        options = METHODS[name].options_from_json(best["options"])
    except ValueError as exc:
        raise SystemExit(f"bad method spec {spec!r}: {path}: {exc}") from None
    label = best.get("label") or f"{name}_{os.path.splitext(os.path.basename(path))[0]}"
    return str(label), options


def parse_method_spec(spec: str, defaults: dict) -> tuple[str, str, dict]:
    """``(label, name, options)`` of ``name``, ``name:k=v,k=v`` or ``name:@best.json`` (the options
    ``lnsr tune`` chose); options start from the method's ``DEFAULTS``, then ``defaults`` (the command
    line's flags) for its ``FROM_CLI`` options, then the spec's own."""
    name, _, rest = spec.partition(":")
    if name not in METHODS:
        raise SystemExit(f"unknown method {name!r}: choose from {', '.join(METHODS)} "
                         f"(register more with lnsr.methods.register_method)")
    cls = METHODS[name]
    options = dict(cls.DEFAULTS)
    options.update({k: defaults[k] for k in cls.FROM_CLI if k in defaults})
    label = name
    if rest.startswith("@"):  # name:@best.json[,key=value,...]: the tuned options, then overrides
        path, _, rest = rest[1:].partition(",")
        label, chosen = _options_from_file(name, path, spec)
        options.update(chosen)
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
            if not eq or key not in cls.spec_keys():
                raise SystemExit(f"bad method spec {spec!r}: expected {name}:key=value[,key=value] with keys "
                                 f"from {', '.join(cls.spec_keys()) or '(none)'}")
            try:
                options[key] = cls.parse_option(key, raw.strip())
            except ValueError as exc:
                raise SystemExit(f"bad method spec {spec!r}: {exc}") from None
            parts.append(f"{key}{raw.strip()}")
        label = label_head + "_" + "_".join(parts)
    cls.validate(label, options)
    return label, name, options
