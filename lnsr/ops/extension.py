"""Loading ``lnsr._C``, the compiled kernels (``csrc/``) of the ``cpu`` and ``cuda`` backends.

Importing ``lnsr._C`` registers the ops ``torch.ops.lnsr.{noise, perturb, perturb_backward,
layer_penalty, layer_penalty_backward}`` (C++ ``TORCH_LIBRARY``: CPU and CUDA kernels, and the
autograd of ``perturb`` and ``layer_penalty``).  This module adds the fake implementations that
``torch.compile`` and ``opcheck`` need, shared with the Triton ops
(``lnsr.ops.backend.register_op_extras``: one schema), and knows which GPUs the build runs on.

The backends themselves (``ExtensionBackend``, ``backend(kind)``, still importable from here) are in
``lnsr/ops/backends/extension.py``.  ``backend(kind)`` raises ImportError when the extension is not
built, fails to load, or (for ``kind='cuda'``) was built without CUDA kernels; ``lnsr.ops.dispatch``
then falls back and keeps the reason.  A build that exists but does not load (e.g. compiled against
another torch) also warns once.
"""
from __future__ import annotations

import importlib.util
import re
import warnings

import torch

from .backend import register_op_extras

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


def parse_archs(token: str | None) -> list[tuple[int, int, str, bool]] | None:
    """``(major, minor, suffix, ptx)`` per arch of lnsr._C's ``CUDA_ARCHS`` (setup.py ``arch_token``:
    ``'0_8.0_9.0_PTX'`` -> ``[(8, 0, '', False), (9, 0, '', True)]``); None when unknown (a build
    from before the attribute existed, or named archs such as ``Ampere``)."""
    if not token:
        return None
    parts = token.split("_")
    if parts[0] != "0":
        return None
    archs = []
    for part in parts[1:]:
        if part.upper() == "PTX" and archs:
            archs[-1] = archs[-1][:3] + (True,)
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", part)
        if m is None:
            return None
        archs.append((int(m.group(1)), int(m.group(2)), m.group(3), False))
    return archs or None


def runs_on(capability: tuple[int, int], archs) -> bool:
    """Whether code built for ``archs`` (``parse_archs``) runs on a GPU of ``capability``: machine
    code for the same major and a minor not above the device's (``a`` variants: that arch only), or
    PTX of an arch not above the device's (the driver compiles it)."""
    cap = tuple(capability)
    for major, minor, suffix, ptx in archs:
        if suffix == "a":
            if (major, minor) == cap:
                return True
            continue
        if major == cap[0] and minor <= cap[1]:
            return True
        if ptx and (major, minor) <= cap:
            return True
    return False


def compiled_archs():
    """The CUDA archs lnsr._C was compiled for (``parse_archs``), None when unknown or not built."""
    try:
        return parse_archs(getattr(load(), "CUDA_ARCHS", None))
    except ImportError:
        return None


_CAPABILITY_OK: dict[tuple[int, int], bool] = {}


def _capability_ok(device) -> bool:
    # Once per capability (supports() runs on every op call), warning once when the build lacks it.
    cap = tuple(torch.cuda.get_device_capability(device))
    ok = _CAPABILITY_OK.get(cap)
    if ok is None:
        archs = compiled_archs()
        ok = _CAPABILITY_OK[cap] = archs is None or runs_on(cap, archs)  # unknown: trust the build
        if not ok:
            warnings.warn(f"lnsr: {capability_reason(cap)}; backend='auto' uses Triton (or torch) on this GPU "
                          f"instead", RuntimeWarning, stacklevel=2)
    return ok


def capability_reason(cap) -> str:
    archs = getattr(_C, "CUDA_ARCHS", "?").removeprefix("0_").replace("_PTX", "+PTX").replace("_", ";")
    return (f"lnsr._C has no CUDA code for this GPU (compute capability {cap[0]}.{cap[1]}; built for "
            f"TORCH_CUDA_ARCH_LIST={archs}); rebuild with `TORCH_CUDA_ARCH_LIST=\"{cap[0]}.{cap[1]}\" "
            f"pip install --no-build-isolation -e .`")


# ---------------------------------------------------------------------------------------------
# The ops' Python parts (their fake implementations are registered in lnsr.ops.backend, shared with
# the Triton ops of the same schema)
# ---------------------------------------------------------------------------------------------

def _register_python_parts() -> None:
    # the fake implementations only: autograd is C++ (the Autograd kernels of csrc/binding.cpp)
    register_op_extras("lnsr", autograd=False)


# ``ExtensionBackend`` and ``backend(kind)`` are in lnsr/ops/backends/extension.py (one file per
# backend, issue #34); still importable from here.
def __getattr__(name):
    if name in ("ExtensionBackend", "backend"):
        from .backends import extension as _backend_module

        return getattr(_backend_module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
