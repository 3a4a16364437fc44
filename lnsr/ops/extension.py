"""The ``cpu`` and ``cuda`` backends: the compiled kernels of ``lnsr._C`` (``csrc/``).

Importing ``lnsr._C`` registers the ops ``torch.ops.lnsr.{noise, perturb, perturb_backward,
layer_penalty, layer_penalty_backward}`` (C++ ``TORCH_LIBRARY``, CPU and CUDA kernels).  This module
adds what is easier in Python: autograd and the fake implementations that ``torch.compile`` and
``opcheck`` need, shared with the Triton ops (``lnsr.ops.backend.register_op_extras``: one schema).

``backend(kind)`` raises ImportError when the extension is not built, fails to load, or (for
``kind='cuda'``) was built without CUDA kernels; ``lnsr.ops.dispatch`` then falls back and keeps the
reason.  A build that exists but does not load (e.g. compiled against another torch) also warns once.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch

from .backend import OpsBackend, register_op_extras

_C = None
_LOAD_ERROR: str | None = None


def _is_built() -> bool:
    try:
        return importlib.util.find_spec("lnsr._C") is not None
    except (ImportError, ValueError):
        return False


def load_error() -> str | None:
    """Why lnsr._C could not be used (None when it loaded or was never tried)."""
    return _LOAD_ERROR


def load():
    """Import ``lnsr._C`` once and register the Python parts of the ops; ImportError if impossible."""
    global _C, _LOAD_ERROR
    if _C is not None:
        return _C
    if _LOAD_ERROR is not None:
        raise ImportError(_LOAD_ERROR)
    if not _is_built():
        _LOAD_ERROR = ("lnsr._C is not built (install with `pip install --no-build-isolation -e .`; "
                       "LNSR_NO_EXT=1 skips it)")
        raise ImportError(_LOAD_ERROR)
    try:
        from .. import _C as mod
    except (ImportError, OSError) as exc:
        # Built but unusable (typically compiled against a different torch): say so once, loudly.
        _LOAD_ERROR = f"lnsr._C is built but failed to load: {type(exc).__name__}: {exc}"
        warnings.warn(f"{_LOAD_ERROR}; lnsr falls back to the Triton/torch backends. Rebuild with "
                      "`pip install --no-build-isolation -e .`", RuntimeWarning, stacklevel=3)
        raise ImportError(_LOAD_ERROR) from exc
    _register_python_parts()
    _C = mod
    return mod


def with_cuda() -> bool:
    """Whether ``lnsr._C`` was compiled with its CUDA kernels (False when it is not importable)."""
    try:
        return bool(load().WITH_CUDA)
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------------
# The backend (the contract of lnsr.ops.backend; the ops' fake implementations and autograd are
# registered there, shared with the Triton ops of the same schema)
# ---------------------------------------------------------------------------------------------

def _register_python_parts() -> None:
    register_op_extras("lnsr")


class ExtensionBackend(OpsBackend):
    """The ``cpu`` or ``cuda`` backend: the ops ``torch.ops.lnsr.*`` of lnsr._C."""

    namespace = "lnsr"

    def __init__(self, name: str):
        self.name = name

    def supports(self, device) -> bool:
        device = torch.device(device)
        if device.type != self.name:
            return False
        return self.name == "cpu" or with_cuda()


def backend(kind: str) -> ExtensionBackend:
    """The ``cpu`` or ``cuda`` backend; ImportError when lnsr._C (or its CUDA part) is missing."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"extension backends are 'cpu' and 'cuda', got {kind!r}")
    mod = load()
    if kind == "cuda" and not mod.WITH_CUDA:
        raise ImportError("lnsr._C was built without CUDA kernels (no CUDA toolkit at build time, or LNSR_NO_CUDA=1); rebuild "
                          "with `CUDA_HOME=/path/to/cuda pip install --no-build-isolation -e .`")
    return ExtensionBackend(kind)
