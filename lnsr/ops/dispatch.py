"""Backend selection for the ops (docs/design.md §4).

A backend is a ``lnsr.ops.backend.Backend`` (the contract, docs/design.md §5).  ``torch`` (the
reference) is always present; ``triton`` (``lnsr.kernels``) and ``cpu``/``cuda`` (``lnsr._C``) are
loaded by the loaders below, which import lazily so that a missing optional dependency costs
nothing until asked for.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .backend import TorchBackend

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")
# Preference order of ``auto`` per device type, fastest first.  A backend is taken only if its
# loader succeeds and it supports the device; ``torch`` always does.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
# What to install when a requested backend is missing.
INSTALL_HINT = {
    "triton": "install Triton (`pip install triton`, bundled with CUDA builds of torch) and use CUDA tensors",
    "cuda": "build the extension with a CUDA toolkit: `CUDA_HOME=/path/to/cuda pip install --no-build-isolation -e .`",
    "cpu": "build the extension: `pip install --no-build-isolation -e .` (needs a C++ compiler and ninja)",
}


def _torch_backend():
    return TorchBackend()


def _triton_backend():
    from .. import kernels  # lnsr.kernels (kernels/ in the source tree)

    return kernels.backend()


def _extension_backend(kind: str):
    from . import extension  # wraps the compiled lnsr._C

    return extension.backend(kind)


_LOADERS: dict[str, Callable[[], object]] = {
    "torch": _torch_backend,
    "triton": _triton_backend,
    "cpu": lambda: _extension_backend("cpu"),
    "cuda": lambda: _extension_backend("cuda"),
}
_CACHE: dict[str, object] = {}
_ERRORS: dict[str, str] = {}


def register_loader(name: str, loader: Callable[[], object]) -> None:
    """Register (or replace) the loader of a backend; the loader raises ImportError when absent."""
    _LOADERS[name] = loader
    _CACHE.pop(name, None)
    _ERRORS.pop(name, None)


def _load(name: str):
    if name in _CACHE:
        return _CACHE[name]
    if name in _ERRORS:
        return None
    loader = _LOADERS.get(name)
    if loader is None:
        _ERRORS[name] = "not built into this version of lnsr"
        return None
    try:
        impl = loader()
    except (ImportError, AttributeError, OSError, RuntimeError) as exc:  # missing package or extension
        _ERRORS[name] = f"{type(exc).__name__}: {exc}"
        return None
    _CACHE[name] = impl
    return impl


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that load here and support ``device`` (all devices when None)."""
    out = []
    for name in BACKENDS[1:]:
        impl = _load(name)
        if impl is not None and (device is None or impl.supports(torch.device(device))):
            out.append(name)
    return out


def load_backend(name: str):
    """Load the named backend (not ``auto``) or raise, naming what to install."""
    if name not in BACKENDS or name == "auto":
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS[1:])}")
    impl = _load(name)
    if impl is None:
        raise RuntimeError(f"lnsr backend {name!r} is not available ({_ERRORS.get(name)}); "
                           f"{INSTALL_HINT.get(name, '')}".rstrip("; "))
    return impl


def resolve_backend(backend: str, device: torch.device | str):
    """The backend object for ``backend`` on ``device``; ``auto`` honours ``LNSR_BACKEND``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "auto":
        forced = os.environ.get("LNSR_BACKEND", "").strip().lower()
        if forced and forced != "auto":
            if forced not in BACKENDS:
                raise ValueError(f"LNSR_BACKEND={forced!r} is not a backend; choose one of {', '.join(BACKENDS)}")
            return resolve_backend(forced, device)
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            impl = _load(name)
            if impl is not None and impl.supports(device):
                return impl
        return _load("torch")
    impl = load_backend(backend)
    if not impl.supports(device):
        why = getattr(impl, "unsupported_reason", lambda d: None)(device)
        if why:
            raise RuntimeError(f"lnsr backend {backend!r} cannot run on {device}: {why}; or use backend='auto'")
        raise RuntimeError(f"lnsr backend {backend!r} does not run on {device.type} tensors; "
                           f"use backend='auto' or move the model to a device it supports")
    return impl
