"""``LNSRConfig``: every option of ``lnsr.LNSR``, validated once, here; and the option schema.

``lnsr.LNSR``, ``LNSRTrainer``, the fine-tuning method and the command line all build one of these,
so an option means the same and fails the same way everywhere.  Checks that need the model (the
range of ``inject_at``, the length of ``layer_weights``) are here too, in ``resolve``.

Each field is declared with ``option(...)``: its default, a one-line help, its choices and where
it appears (``cli``: a shared flag of ``lnsr finetune`` / ``lnsr tune``; ``spec``: settable in a
method spec ``lnsr:key=value`` and as a ``lnsr tune --grid`` axis).  Everything that lists the
options is derived from that: the flags (``add_lnsr_flags``), the parsing of spec values
(``LNSRConfig.parse_value`` / ``parse_overrides``), best.json (``to_json`` / ``from_json``) and
README's option table (``options_table``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from . import ops
from .dropout import DROPOUT_MODES

NORMALIZE_MODES = ("token", "element", "gain")

# The options with a fixed set of values (argparse ``choices=``).
CHOICES = {"noise": ops.NOISE_KINDS, "normalize": NORMALIZE_MODES, "dropout": DROPOUT_MODES,
           "backend": ops.BACKENDS}

# The penalty weight everything defaults to (lnsr.LNSR, LNSRTrainer, --lam, lnsr: specs); tune's
# default grid is centred on it.  Its source is stated in the option's help below.
DEFAULT_LAM = 0.003
_LAM_SOURCE = ("default 0.003: the held-out choice of 3 of the 4 regimes of docs/results.md; "
               "tune it with `lnsr tune`")


def _ops_backends():
    return ops.BACKENDS


def option(default, help: str, *, choices=None, cli: bool = False, spec: bool = False, doc: str | None = None,
           shown: str | None = None):
    """A field of ``LNSRConfig`` with its schema in ``metadata``.

    ``help``: one line, plain text (the command line's help); ``doc``: the README table's meaning
    (markdown; default: ``help``); ``shown``: the README table's default when the value itself
    would mislead (``None`` that means "found per model"); ``cli``: a shared flag
    ``--name-with-dashes``; ``spec``: settable as ``lnsr:name=value`` and as a tune grid axis.
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "doc": doc or help, "shown": shown, "cli": cli, "spec": spec,
        # a live sequence stays live: ops.BACKENDS grows when a backend registers after import
        "choices": None if choices is None else (choices if choices is _ops_backends() else tuple(choices))})


@dataclass(frozen=True)
class Option:
    """One option of the schema (``LNSRConfig.schema()[name]``)."""
    name: str
    type: type | None     # float, int, str or bool; None: not a scalar (set it from Python)
    optional: bool        # None is a valid value too
    default: Any
    choices: tuple | None
    help: str             # one line, for the command line
    doc: str              # README's meaning column
    shown: str            # README's default column
    cli: bool
    spec: bool

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _scalar_type(hint) -> tuple[type | None, bool]:
    """``(scalar type or None, optional)`` of a field's type annotation."""
    if hint in (float, int, str, bool):
        return hint, False
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in (float, int, str, bool):
            return rest[0], True
    return None, False


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True, kw_only=True)  # keyword-only: the field order is the table's, not an API
class LNSRConfig:
    """The options of ``lnsr.LNSR`` (see its docstring); invalid values raise on construction.

    Frozen: derive a variant with ``config.replace(lam=0.01)`` (validated again).  The fields'
    metadata is the option schema (``LNSRConfig.schema()``).
    """
    sigma: float = option(0.05, "noise scale (relative noise: a fraction of each token's rms)",
                          doc="noise scale (>= 0)", cli=True, spec=True)
    noise: str = option(
        "relative", "gaussian: sigma*z; relative: sigma*rms(token)*z; manifold: Gaussian in the span of the "
                    "batch's tokens",
        doc="`gaussian` (`sigma*z`), `relative` (`sigma*rms(h_token)*z`, so `‖eps‖ ≈ sigma‖h‖`), `manifold` "
            "(Gaussian in the span of `n_anchors` centred valid tokens of the batch)",
        choices=CHOICES["noise"], cli=True, spec=True)
    inject_at: int = option(
        0, "block whose input gets the noise: 0 is the embeddings' output; negative counts from the top",
        doc="block whose input is perturbed: 0 = the embeddings' output; negative counts from the top",
        cli=True, spec=True)
    lam: float = option(
        DEFAULT_LAM, f"weight of the noise-stability penalty; {_LAM_SOURCE}",
        doc=f"weight of the penalty in `reg.loss`; {_LAM_SOURCE}. With `relative`/`token` defaults the useful range "
            f"on MRPC is narrow: 0.03 cost 4.8-7.1 accuracy points on held-out data and no strength from 0.003 to "
            f"0.03 beat the `lam = 0` control there (docs/results.md)",
        cli=True, spec=True)
    layer_weights: tuple | None = option(
        None, "one weight per regularised block (L - inject_at of them); default 1 each",
        doc="one weight per regularised block (`L - inject_at` of them)", shown="all 1")
    normalize: str = option(
        "token", "token: squared L2 per token; element: also divided by the hidden size; gain: each layer's "
                 "term scale- and sigma-free",
        doc="`token`: squared L2 per token; `element`: also divided by `H`; `gain`: each layer's term over "
            "`s²·mean‖y_j‖²` (scale- and sigma-free)",
        choices=CHOICES["normalize"], cli=True, spec=True)
    dropout: str = option(
        "paired", "dropout in the regularised blocks: paired (clean and noisy halves share masks), independent "
                  "(masks per half), off (none during regularised forwards)",
        doc="`paired`: the clean and noisy halves share every `nn.Dropout` mask in blocks >= k, "
            "attention-probability dropout there is off during regularised forwards (P measures `eps` alone; "
            "P = 0 at sigma 0); `independent`: masks per half (adds an R-Drop-like term); `off`: no dropout in "
            "blocks >= k during regularised forwards",
        choices=CHOICES["dropout"], cli=True, spec=True)
    detach_clean: bool = option(
        False, "no gradient through the clean half of the penalty (default: through both halves)",
        doc="stop the penalty's gradient on the clean path", cli=True, spec=True)
    n_anchors: int = option(ops.DEFAULT_ANCHORS, "manifold noise: tokens spanning the noise subspace",
                            doc="anchors of `manifold` noise")
    blocks: Any = option(
        None, "None (found per model type), an attribute path such as 'encoder.layer', or a list of modules",
        doc='list of blocks (bottom first) or an attribute path such as `"encoder.layer"`', shown="auto")
    backend: str = option(
        "auto", "implementation of LNSR's ops: torch (reference), triton, cpu/cuda (the compiled extension); "
                "auto picks per device (LNSR_BACKEND overrides it)",
        doc="`torch` (reference), `triton`, `cpu`, `cuda`; `LNSR_BACKEND` overrides `auto`. On a GPU with both "
            "`cuda` and `triton`, `auto` times them on the first call per op and input class and keeps the faster "
            "(`LNSR_AUTO=rule`: the fixed order). On `cpu`/`cuda` the penalty's per-block tap is C++ "
            "(`LNSR_PYTHON_TAP=1`: the Python one, the same values)",
        choices=CHOICES["backend"], cli=True, spec=True)
    every: int = option(
        1, "regularise one training forward in `every`",
        doc="regularise one training forward in `every`; the others run plain and `reg.loss` is a zero", spec=True)
    noisy_fraction: float = option(
        1.0, "share of the batch (its last rows) given a noisy copy",
        doc="only the last `ceil(r·B)` rows of the batch get a noisy copy: the extra branch costs `r` instead of 1",
        spec=True)
    rank: int | None = option(
        None, "folded into the noise seed; None: torch.distributed's rank",
        doc="folded into the noise seed so that each rank draws distinct noise", shown="from `torch.distributed`")
    check_finite: bool = option(
        True, "raise on NaN/Inf where the noise goes in (one host sync per step)",
        doc="raise on NaN/Inf in the hidden state where noise is injected (one reduction and a host sync per step; "
            "skipped under `torch.compile` tracing)")
    add_to_loss: bool = option(
        False, "also add lam * P to the model's own outputs.loss",
        doc="also add `lam * P` to the model output's `loss` (`ModelOutput.loss` or a dict's `\"loss\"`)")

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise the stored values once, here
        if not _is_real(self.sigma):
            raise TypeError(f"sigma must be a float >= 0 (the noise scale), got {self.sigma!r}")
        if not math.isfinite(self.sigma) or self.sigma < 0:
            raise ValueError(f"sigma must be a finite float >= 0 (the noise scale), got {self.sigma!r}")
        set_(self, "sigma", float(self.sigma))
        for opt in _schema().values():
            value = getattr(self, opt.name)
            if opt.choices is not None and value not in opt.choices:
                raise ValueError(f"{opt.name} must be one of {', '.join(opt.choices)}, got {value!r}")
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

    # -- the schema ------------------------------------------------------------------------------------
    @classmethod
    def schema(cls) -> dict[str, Option]:
        """``{name: Option}`` for every option, in the order of the fields."""
        return dict(_schema())

    @classmethod
    def cli_names(cls) -> tuple[str, ...]:
        """The options with a shared flag of ``lnsr finetune`` / ``lnsr tune`` (``--lam``, ...)."""
        return tuple(o.name for o in _schema().values() if o.cli)

    @classmethod
    def spec_names(cls) -> tuple[str, ...]:
        """The options settable as ``lnsr:name=value`` and as ``lnsr tune --grid`` axes."""
        return tuple(o.name for o in _schema().values() if o.spec)

    @classmethod
    def parse_value(cls, name: str, raw: str):
        """The typed, checked value of option ``name`` from text (``"0.01"``, ``"true"``, ``"gaussian"``).

        Raises ``ValueError`` with one line that says what the value must be."""
        opt = _schema().get(name)
        if opt is None:
            raise ValueError(f"unknown LNSR option {name!r}; the options are {', '.join(cls.names())}")
        if opt.type is None:
            raise ValueError(f"{name} cannot be given as text: pass it from Python (lnsr.LNSR(model, {name}=...))")
        text = str(raw).strip()
        if opt.optional and text.lower() in ("none", ""):
            value = None
        elif opt.type is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError(f"{name}={text!r}: expected true or false (also 1/0, yes/no, on/off)")
            value = text.lower() in _TRUE
        elif opt.type is str:
            value = text
        else:
            try:
                value = opt.type(text)
            except ValueError:
                raise ValueError(f"{name}={text!r}: expected {'an int' if opt.type is int else 'a float'}"
                                 f"{' or none' if opt.optional else ''}") from None
        try:
            cls(**{name: value})  # the same checks as every other way in (choices, ranges)
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        return value

    @classmethod
    def parse_overrides(cls, items, names=None) -> dict:
        """``"lam=0.01,noise=gaussian"`` (or ``["lam=0.01", ...]``) -> ``{"lam": 0.01, "noise": "gaussian"}``.

        ``names``: the options accepted (default: ``spec_names()``); keys may use ``-`` for ``_``.
        Raises ``ValueError`` with one line naming the valid keys, or what a bad value must be."""
        allowed = cls.spec_names() if names is None else tuple(names)
        if isinstance(items, str):
            items = items.split(",")
        out = {}
        for item in items:
            key, eq, raw = str(item).partition("=")
            key = key.strip().replace("-", "_")
            if not eq or key not in allowed:
                what = f"unknown option {key!r}" if eq else f"{str(item).strip()!r} is not key=value"
                raise ValueError(f"{what}; the keys are {', '.join(allowed)}")
            out[key] = cls.parse_value(key, raw)
        return out

    # -- JSON (best.json) ------------------------------------------------------------------------------
    def to_json(self, names=None) -> dict:
        """The options as a JSON-ready dict (tuples as lists); ``names``: only these, in that order
        (``lnsr tune``'s best.json holds the options its runs set).  ``from_json`` reads it back."""
        names = self.names() if names is None else tuple(names)
        unknown = [n for n in names if n not in self.names()]
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; the options are {', '.join(self.names())}")
        out = {}
        for name in names:
            value = getattr(self, name)
            if name == "blocks" and value is not None and not isinstance(value, str):
                raise ValueError("blocks holds modules, which JSON cannot carry: give blocks as an attribute path "
                                 "(e.g. 'encoder.layer') or leave it out (names=...)")
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, data) -> "LNSRConfig":
        """A config from ``to_json``'s dict, from JSON text of one, or from the record ``lnsr tune``
        writes (best.json: its ``best.options``).  Text values of typed options (``"0.01"``) are
        parsed as ``parse_value`` does; unknown options raise ``ValueError`` naming the valid ones."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise ValueError(f"not JSON ({exc}); pass the text of a file, e.g. open('best.json').read()") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a JSON object of LNSR options, got {type(data).__name__}")
        if "best" in data:  # the whole record of `lnsr tune`
            best = data["best"]
            if not isinstance(best, Mapping) or not isinstance(best.get("options"), Mapping):
                raise ValueError("this lnsr tune record has no 'best' entry with 'options' (tied arms or no "
                                 "finished run choose nothing): run lnsr tune again, or give the options")
            if best.get("method", "lnsr") != "lnsr":
                raise ValueError(f"this lnsr tune record holds options of method {best.get('method')!r}, not lnsr")
            data = best["options"]
        unknown = [k for k in data if k not in cls.names()]
        if unknown:
            raise ValueError(f"unknown LNSR option(s) {unknown}; the options are {', '.join(cls.names())}")
        schema = _schema()
        options = {k: cls.parse_value(k, v) if isinstance(v, str) and schema[k].type not in (str, None) else v
                   for k, v in data.items()}
        return cls(**options)

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


_SCHEMA: dict[str, Option] = {}


def _schema() -> dict[str, Option]:
    """The schema, read once from the fields (their annotations and ``option`` metadata)."""
    if not _SCHEMA:
        hints = typing.get_type_hints(LNSRConfig)
        for f in dataclasses.fields(LNSRConfig):
            typ, optional = _scalar_type(hints[f.name])
            md = f.metadata
            if "help" not in md:
                raise TypeError(f"LNSRConfig.{f.name} is not declared with option(...): give it a help line")
            shown = md["shown"] or (f'`"{f.default}"`' if isinstance(f.default, str) else f"`{f.default!r}`")
            _SCHEMA[f.name] = Option(name=f.name, type=typ, optional=optional, default=f.default,
                                     choices=md["choices"], help=md["help"], doc=md["doc"], shown=shown,
                                     cli=md["cli"], spec=md["spec"])
    return _SCHEMA


# -- derived: the command line's flags, README's table ---------------------------------------------------
def add_lnsr_flags(group, names=None) -> None:
    """Add the shared LNSR flags (``--sigma``, ``--lam``, ...; ``names``: only these, default the
    ``cli`` options) to an argparse parser or group: type, default, choices and help from the schema."""
    schema = _schema()
    for name in (LNSRConfig.cli_names() if names is None else names):
        opt = schema[name]
        if opt.type is bool:
            if opt.default:  # a switch can only turn a True default off
                group.add_argument("--no-" + opt.flag[2:], dest=name, action="store_false", help=opt.help)
            else:
                group.add_argument(opt.flag, action="store_true", help=opt.help)
        elif opt.choices is not None:
            group.add_argument(opt.flag, choices=opt.choices, default=opt.default, help=opt.help)
        elif opt.type is not None and not opt.optional:
            group.add_argument(opt.flag, type=opt.type, default=opt.default, help=opt.help)
        else:
            raise TypeError(f"LNSRConfig.{name} has no command-line form (type {opt.type}, optional {opt.optional})")


def flag_values(args, names=None) -> dict:
    """The values of the shared LNSR flags in parsed ``args`` (those it has), as options."""
    return {n: getattr(args, n) for n in (LNSRConfig.cli_names() if names is None else names) if hasattr(args, n)}


def options_table() -> str:
    """README's option table (markdown), one row per option: ``| option | default | meaning |``."""
    lines = ["| option | default | meaning |", "|---|---|---|"]
    lines += [f"| `{o.name}` | {o.shown} | {o.doc} |" for o in _schema().values()]
    return "\n".join(lines) + "\n"
