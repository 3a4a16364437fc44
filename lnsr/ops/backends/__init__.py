"""The backends of ``lnsr.ops``, one module each (``torch``, ``triton``, ``extension``), and their
registry (``registry``: ``register_backend`` and how ``auto`` orders them)."""
from .registry import (BUILTIN, BackendSpec, auto_order, discover, get, install_hints, register_backend, specs,
                       unregister_backend)

__all__ = ["BackendSpec", "register_backend", "unregister_backend", "get", "specs", "auto_order",
           "install_hints", "discover", "BUILTIN"]
