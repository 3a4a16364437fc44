"""The lnsr ops: ``noise``, ``perturb``, ``layer_penalty`` and the streamed penalty ``PenaltyStream``.

``perturb`` and ``layer_penalty`` are in ``functional``, ``PenaltyStream`` in ``stream``, ``noise``
and the ground truth in ``reference``; backend selection is ``dispatch``, the backends ``backends/``.
"""
from . import dispatch, reference
from .dispatch import BACKENDS, available_backends, register_loader, resolve_backend
from .functional import layer_penalty, perturb
from .reference import DEFAULT_ANCHORS, NOISE_KINDS, SEED_MAX, make_eps, noise
from .stream import PenaltyStream

__all__ = ["noise", "perturb", "layer_penalty", "PenaltyStream", "make_eps", "available_backends", "resolve_backend",
           "register_loader", "BACKENDS", "NOISE_KINDS", "SEED_MAX", "DEFAULT_ANCHORS", "reference"]
