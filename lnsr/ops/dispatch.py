"""Backend selection for the ops (docs/design.md §4).

A backend is a ``lnsr.ops.backend.Backend`` (the contract, docs/design.md §5) declared in one module
of ``lnsr/ops/backends/`` by one ``register_backend`` call (its name, loader, install hint and
``auto`` preference per device type; ``lnsr.ops.backends.registry``).  The tables here are
derived from the registry and follow it: ``BACKENDS`` (``auto`` and every registered name),
``AUTO_ORDER`` (per device type, highest preference first), ``INSTALL_HINT`` and the loaders
(``_LOADERS``), which import lazily so that a missing optional dependency costs nothing until asked
for.  On the device types of ``SELFCHECK_DEVICES`` (CUDA) ``auto`` takes a backend other than
``torch`` only once it has passed its self-check against the reference (``lnsr.ops.selfcheck``;
``LNSR_SELFCHECK=0`` skips it).
"""
from __future__ import annotations

import collections.abc
import math
import os
import statistics
import threading
import time
import warnings
from typing import Callable

import torch

from .backends import registry
from .backends.registry import register_backend, unregister_backend  # noqa: F401  (public here too)


class _BackendNames(collections.abc.Sequence):
    """``BACKENDS``: ``"auto"`` then every registered backend, a read-only sequence (compares equal
    to the tuple) that follows the registry.  One object, updated in place, because code binds it
    at import: ``lnsr.ops.BACKENDS``, ``LNSRConfig``'s choices, argparse ``choices=``; a backend
    registered later must be accepted there too."""

    __slots__ = ("_names",)

    def __init__(self):
        self._names: tuple[str, ...] = ("auto",)

    def __getitem__(self, i):
        return self._names[i]  # a slice is a tuple

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __eq__(self, other) -> bool:
        return self._names == (tuple(other) if isinstance(other, (tuple, _BackendNames)) else other)

    __hash__ = None

    def __repr__(self) -> str:
        return repr(self._names)


_NAMES = _BackendNames()
BACKENDS = _NAMES
# ``auto``'s order per device type, highest preference first (the ``auto=`` of each registration,
# registry.auto_order()).  A backend is taken only if its loader succeeds and it supports the device
# (and, on SELFCHECK_DEVICES, passes its self-check); ``torch`` always does.
AUTO_ORDER: dict[str, tuple[str, ...]] = {}
# What to install when a requested backend is missing.
INSTALL_HINT: dict[str, str] = {}
_LOADERS: dict[str, Callable[[], object]] = {}
_CACHE: dict[str, object] = {}
_ERRORS: dict[str, str] = {}


def _forget(name: str) -> None:
    """Drop what was loaded, failed or checked for backend ``name``: a new implementation starts anew."""
    _CACHE.pop(name, None)
    _ERRORS.pop(name, None)
    for key in [k for k in _SELFCHECKS if k[0] == name]:
        del _SELFCHECKS[key]
    _SELFCHECK_WARNED.discard(name)


def _registry_changed(name: str) -> None:
    """Follow a change of the registry (backend ``name`` registered, replaced or removed)."""
    global AUTO_ORDER, INSTALL_HINT
    spec = registry.get(name)
    _NAMES._names = ("auto", *(s.name for s in registry.specs()))
    AUTO_ORDER = registry.auto_order()
    INSTALL_HINT = registry.install_hints()
    if spec is not None:
        _LOADERS[name] = spec.load
    else:
        _LOADERS.pop(name, None)
    _forget(name)
    _CHOICES.clear()  # measured choices may hold the old object, or miss a new candidate
    _TIMINGS.clear()


def register_loader(name: str, loader: Callable[[], object]) -> None:
    """Replace the loader of backend ``name``; the loader raises ImportError when absent.  (From
    before the registry: ``register_backend`` declares a backend, with its hint and ``auto``
    preference.)  A name the registry does not hold gets a loader only, outside ``BACKENDS`` and
    ``AUTO_ORDER``."""
    spec = registry.get(name)
    if spec is not None:
        register_backend(name, loader, hint=spec.hint, auto=spec.auto, replace=True)
    else:
        _LOADERS[name] = loader
        _forget(name)


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


# ---------------------------------------------------------------------------------------------
# The self-check (issue #35): kernels that compile may still never have run on the GPU at hand.
# Before ``auto`` first takes a backend other than ``torch`` on a device type of SELFCHECK_DEVICES,
# ``lnsr.ops.selfcheck.selfcheck`` compares it with the reference on small inputs, once per process
# per (backend, device); a failure (a mismatch or any exception) makes ``auto`` pass over it, with
# one warning per backend.  Explicitly named backends are not checked (the caller's choice).
# ---------------------------------------------------------------------------------------------
SELFCHECK_DEVICES = {"cuda"}       # device types where ``auto`` self-checks (the CPU kernels are tested here)
_SELFCHECKS: dict[tuple, object] = {}  # (backend, device type, index) -> selfcheck.SelfCheckResult
_SELFCHECK_WARNED: set[str] = set()    # backends whose failure was reported (once per process)
_SELFCHECK_LOCK = threading.RLock()


def _selfcheck_enabled() -> bool:
    return os.environ.get("LNSR_SELFCHECK", "1").strip().lower() not in ("0", "false", "no", "off")


def _selfcheck_passed(name: str, device_type: str, index) -> bool:
    """The cached result of backend ``name``'s self-check on the device, running it on first use."""
    if device_type == "cuda" and index is None:
        index = torch.cuda.current_device()  # "cuda" and "cuda:0" are one device, one check
    elif device_type == "cpu":
        index = None
    key = (name, device_type, index)
    with _SELFCHECK_LOCK:
        result = _SELFCHECKS.get(key)
        if result is None:
            if device_type == "cuda" and torch.cuda.is_current_stream_capturing():
                return False  # a capture forbids the check's host syncs: pass over it for this call, uncached
            from . import selfcheck  # lazily: selfcheck imports lnsr.ops, which imports this module

            impl = _load(name)
            device = torch.device(device_type) if index is None else torch.device(device_type, index)
            try:
                result = selfcheck.selfcheck(impl, device)
            except Exception as exc:  # the check's own setup failed: the backend is not vouched for either
                result = selfcheck.SelfCheckResult(name, str(device), [selfcheck.Failure(
                    "selfcheck", f"raised {type(exc).__name__}: {exc}")])
            _SELFCHECKS[key] = result
            if not result.ok and name not in _SELFCHECK_WARNED:
                _SELFCHECK_WARNED.add(name)
                order = AUTO_ORDER.get(device_type, ("torch",))
                rest = ", ".join(order[order.index(name) + 1:] if name in order else ("torch",))
                warnings.warn(
                    f"lnsr: backend {name!r} failed its self-check against the torch reference on {device} "
                    f"({result.describe()}), so backend='auto' does not use it and takes the next of {rest}. "
                    f"Set LNSR_BACKEND=torch (or another backend) to silence this, and please report it with "
                    f"the output of `bash bench/gpu_check.sh` (`python -m lnsr.ops.selfcheck` prints every "
                    f"failed comparison)", RuntimeWarning, stacklevel=2)
    return result.ok


# While torch.compile traces, Dynamo calls this function eagerly (real tensors, outside the graph)
# instead of tracing it, and bakes the answer into the graph: the check runs before a backend's
# first traced use too.  The mark is what torch.compiler.assume_constant_result sets, set here
# without it because that imports Dynamo (seconds) at `import lnsr` (test_backend_selfcheck.py
# checks the mechanism under torch.compile).
_selfcheck_passed._dynamo_marked_constant = True


def passes_selfcheck(name: str, device: torch.device | str) -> bool:
    """Whether ``auto`` may use backend ``name`` (loaded, supporting ``device``) on ``device``."""
    device = torch.device(device)
    if name == "torch" or device.type not in SELFCHECK_DEVICES or not _selfcheck_enabled():
        return True
    return _selfcheck_passed(name, device.type, device.index)


def selfcheck_results() -> list[dict]:
    """The self-checks run in this process: one dict per (backend, device)."""
    return [{"backend": r.backend, "device": r.device, "ok": r.ok, "failures": [str(f) for f in r.failures],
             "seconds": r.seconds} for r in _SELFCHECKS.values()]


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
            if impl is not None and impl.supports(device) and passes_selfcheck(name, device):
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


# ---------------------------------------------------------------------------------------------
# ``auto`` by measurement (issue #14): on a device with more than one compiled backend (CUDA: the
# C++ kernels and Triton) the fastest depends on the op, the noise kind and the shape, so a rule
# cannot know it.  The first call of an op for a class of inputs (kind, dtype, hidden size and
# element count rounded up to powers of 2) times each candidate on that input and keeps the
# fastest for the rest of the process.  ``LNSR_AUTO=rule`` keeps AUTO_ORDER's order; nothing is
# measured while torch.compile traces or a CUDA graph is being captured (the rule applies then).
# ---------------------------------------------------------------------------------------------
MEASURED = {"cuda"}                 # device types where ``auto`` measures
_CHOICES: dict[tuple, object] = {}  # (device type, index, op, key) -> backend
_TIMINGS: dict[tuple, dict] = {}    # the same key -> {backend name: median seconds}


def input_class(*parts) -> tuple:
    """A cache key for ``resolve_for``: ints are rounded up to a power of 2, the rest kept."""
    return tuple(1 << max(0, math.ceil(math.log2(p))) if isinstance(p, int) and not isinstance(p, bool) and p > 0
                 else p for p in parts)


def candidates(device: torch.device) -> list:
    """The compiled backends of ``auto``'s order that load and support ``device`` (never ``torch``)."""
    out = []
    for name in AUTO_ORDER.get(device.type, ()):
        impl = _load(name) if name != "torch" else None
        if impl is not None and impl.supports(device) and passes_selfcheck(name, device):
            out.append(impl)
    return out


def _busy(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _median_seconds(run: Callable[[object], object], impl, device: torch.device, reps: int = 3) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run(impl)  # warm-up (a Triton kernel compiles for these shapes here)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run(impl)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def resolve_for(op: str, key: tuple, device: torch.device | str, run: Callable[[object], object]):
    """``auto``'s backend for one call of ``op`` on inputs of class ``key``: measured once per
    (device, op, key) with ``run(backend)`` (a forward + backward of the op on the call's own inputs,
    without autograd), where ``MEASURED`` holds the device type and two or more candidates exist;
    otherwise ``resolve_backend('auto', device)``."""
    device = torch.device(device)
    if (os.environ.get("LNSR_BACKEND", "").strip().lower() not in ("", "auto")
            or os.environ.get("LNSR_AUTO", "measure").strip().lower() == "rule"
            or device.type not in MEASURED or _busy(device)):
        return resolve_backend("auto", device)
    ck = (device.type, device.index, op, key)
    impl = _CHOICES.get(ck)
    if impl is not None:
        return impl
    cands = candidates(device)
    if len(cands) < 2:
        impl = resolve_backend("auto", device)
    else:
        times = {}
        with torch.no_grad():
            for cand in cands:
                try:
                    times[cand.name] = _median_seconds(run, cand, device)
                except Exception as exc:  # a backend that fails on this input is not chosen
                    times[cand.name] = float("inf")
                    _ERRORS.setdefault(f"{cand.name}:{op}", f"{type(exc).__name__}: {exc}")
        _TIMINGS[ck] = times
        best = min(times, key=times.get)
        impl = next(c for c in cands if c.name == best) if math.isfinite(times[best]) else resolve_backend("auto", device)
    _CHOICES[ck] = impl
    return impl


def auto_choices() -> list[dict]:
    """What ``auto`` measured and chose so far: one dict per (device, op, input class)."""
    return [{"device": f"{k[0]}" + (f":{k[1]}" if k[1] is not None else ""), "op": k[2], "key": k[3],
             "backend": impl.name, "seconds": _TIMINGS.get(k, {})} for k, impl in _CHOICES.items()]


# Follow the registry: every change from here on, the built-in backends' registrations included
# (discover imports lnsr/ops/backends/*), and whatever was registered before (nothing, normally).
registry._subscribe(_registry_changed)
registry.discover()
for _name in [spec.name for spec in registry.specs()]:
    _registry_changed(_name)
