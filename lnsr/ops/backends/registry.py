"""The backend registry (issue #34, "a backend is one file"): every backend declares itself once.

A backend is one module that defines (or imports) its ``lnsr.ops.backend.Backend`` and calls, once
per name it provides::

    register_backend("mine", load=MineBackend, hint="pip install mine", auto={"cuda": 150})

- ``name``: what ``backend=`` and ``LNSR_BACKEND`` accept (``lnsr.ops.BACKENDS``); lowercase,
  because ``LNSR_BACKEND`` is read lowercased.
- ``load``: a callable returning the backend object, called on first use.  It imports the
  backend's optional dependencies (so a missing one costs nothing until asked for) and raises
  ImportError (or OSError, RuntimeError, AttributeError) when they are missing: ``auto`` then skips
  the backend and keeps the reason, an explicit request raises naming ``hint``.
- ``hint``: what to install when it is missing.
- ``auto``: ``{device type: preference}``.  ``backend="auto"`` tries, per device type, the backends
  that name it, highest preference first (equal ones in registration order), and takes the first
  that loads, supports the device and passes its self-check (CUDA).  The built-in preferences:
  ``cuda`` 200 and ``triton`` 100 on "cuda", ``cpu`` 100 on "cpu", ``torch`` (the reference) 0 on
  both.  A device type the backend does not name is never picked by ``auto``; it can still be
  requested by name.

``discover()`` imports the built-in modules (``BUILTIN``, this folder; ``lnsr.ops.dispatch`` calls
it at import).  ``lnsr.ops.backends`` re-exports this module's public names.  Another package's
backend registers the same way from its own module, imported before use.  ``lnsr.ops.dispatch``
derives ``BACKENDS``, ``AUTO_ORDER``, ``INSTALL_HINT`` and its loaders from this registry and
follows every change (``register_backend``, ``unregister_backend``).
``tests/test_backend_contract.py`` runs the contract on one module's backends with
``LNSR_CONTRACT_BACKEND=path/to/module.py`` (or a module name).

This module does not import torch (nor anything heavy): the built-in backends import what they need.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
import threading
import types
from typing import TYPE_CHECKING, Callable, Mapping

if TYPE_CHECKING:
    from ..backend import Backend

__all__ = ["BackendSpec", "register_backend", "unregister_backend", "get", "specs", "auto_order",
           "install_hints", "discover", "BUILTIN"]

# The built-in backend modules of this folder, imported by ``discover`` in this order (the order of
# ``BACKENDS``): torch (the reference), triton (lnsr.kernels), extension (cuda and cpu, lnsr._C).
BUILTIN = ("torch", "triton", "extension")

_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """One registered backend: see the module's docstring for the fields."""

    name: str
    load: Callable[[], "Backend"]
    hint: str = ""
    auto: Mapping[str, int] = dataclasses.field(default_factory=dict)
    module: str = "?"  # the module that registered it (for messages)


_SPECS: dict[str, BackendSpec] = {}  # by name, in registration order
_LISTENERS: list[Callable[[str], None]] = []
_LOCK = threading.RLock()
_DISCOVERED = False


def register_backend(name: str, load: Callable[[], "Backend"], *, hint: str = "",
                     auto: Mapping[str, int] | None = None, replace: bool = False) -> BackendSpec:
    """Register backend ``name`` (see the module's docstring).  A name already registered raises
    ValueError unless ``replace=True``, which keeps its place in ``BACKENDS``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == "auto":
        raise ValueError(f"a backend name is a lowercase identifier other than 'auto', got {name!r}")
    if not callable(load):
        raise TypeError(f"load must be a callable returning the backend object, got {load!r}")
    if not isinstance(hint, str):
        raise TypeError(f"hint must be a str (what to install), got {hint!r}")
    auto = dict(auto or {})
    for device_type, pref in auto.items():
        if not isinstance(device_type, str) or isinstance(pref, bool) or not isinstance(pref, int):
            raise TypeError(f"auto maps a device type (str) to a preference (int), got {device_type!r}: {pref!r}")
    spec = BackendSpec(name, load, hint, types.MappingProxyType(auto), getattr(load, "__module__", None) or "?")
    with _LOCK:
        old = _SPECS.get(name)
        if old is not None and not replace:
            raise ValueError(f"backend {name!r} is already registered (by {old.module}); pass replace=True to "
                             f"replace it, or unregister_backend({name!r}) first")
        _SPECS[name] = spec
        _notify(name)
    return spec


def unregister_backend(name: str) -> BackendSpec:
    """Remove backend ``name``; returns its spec (KeyError when it is not registered)."""
    with _LOCK:
        spec = _SPECS.pop(name)
        _notify(name)
    return spec


def get(name: str) -> BackendSpec | None:
    return _SPECS.get(name)


def specs() -> tuple[BackendSpec, ...]:
    """Every registered backend, in registration order."""
    return tuple(_SPECS.values())


def auto_order() -> dict[str, tuple[str, ...]]:
    """``auto``'s order per device type: the backends naming it, highest preference first."""
    types_ = {t: None for s in _SPECS.values() for t in s.auto}
    return {t: tuple(s.name for s in sorted((s for s in _SPECS.values() if t in s.auto),
                                            key=lambda s: -s.auto[t]))  # stable: ties keep registration order
            for t in types_}


def install_hints() -> dict[str, str]:
    """What to install per backend, for those that say."""
    return {s.name: s.hint for s in _SPECS.values() if s.hint}


def discover() -> None:
    """Import the built-in backend modules (once); each registers itself."""
    global _DISCOVERED
    with _LOCK:
        if _DISCOVERED:
            return
        _DISCOVERED = True
        for mod in BUILTIN:
            importlib.import_module(f"{__package__}.{mod}")


def _subscribe(listener: Callable[[str], None]) -> None:
    """Call ``listener(name)`` after every change to backend ``name`` (lnsr.ops.dispatch's tables)."""
    _LISTENERS.append(listener)


def _notify(name: str) -> None:
    for listener in list(_LISTENERS):
        listener(name)
