"""The ``cuda`` and ``cpu`` backends: the compiled kernels of ``lnsr._C`` (``csrc/``).

``lnsr.ops.extension`` loads ``lnsr._C`` (once, warning when a build exists but does not load) and
knows which GPUs its CUDA code runs on; this module is the backend on top: ``ExtensionBackend``, the
contract of ``lnsr.ops.backend`` on the ops ``torch.ops.lnsr.*``, and the two registrations.  The
helpers are called through the module (``_ext.with_cuda()``), so that a test patching them there
patches them here too.
"""
from __future__ import annotations

import torch

from .. import extension as _ext
from ..backend import OpsBackend
from .registry import register_backend


class ExtensionBackend(OpsBackend):
    """The ``cpu`` or ``cuda`` backend: the ops ``torch.ops.lnsr.*`` of lnsr._C."""

    namespace = "lnsr"

    def __init__(self, name: str):
        self.name = name

    def supports(self, device) -> bool:
        device = torch.device(device)
        if device.type != self.name:
            return False
        return self.name == "cpu" or (_ext.with_cuda() and _ext._capability_ok(device))

    def unsupported_reason(self, device) -> str | None:
        """Why ``supports(device)`` is False when the device type is right (for an explicit request)."""
        device = torch.device(device)
        if device.type == "cuda" == self.name and _ext.with_cuda() and not _ext._capability_ok(device):
            return _ext.capability_reason(tuple(torch.cuda.get_device_capability(device)))
        return None


def backend(kind: str) -> ExtensionBackend:
    """The ``cpu`` or ``cuda`` backend; ImportError when lnsr._C (or its CUDA part) is missing."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"extension backends are 'cpu' and 'cuda', got {kind!r}")
    mod = _ext.load()
    if kind == "cuda" and not mod.WITH_CUDA:
        raise ImportError("lnsr._C was built without CUDA kernels (no CUDA toolkit at build time, or LNSR_NO_CUDA=1); rebuild "
                          "with `CUDA_HOME=/path/to/cuda pip install --no-build-isolation -e .`")
    return ExtensionBackend(kind)


def load_cuda() -> ExtensionBackend:
    return backend("cuda")


def load_cpu() -> ExtensionBackend:
    return backend("cpu")


register_backend(
    "cuda", load_cuda, auto={"cuda": 200},
    hint="build the extension with a CUDA toolkit: `CUDA_HOME=/path/to/cuda pip install --no-build-isolation -e .`")
register_backend(
    "cpu", load_cpu, auto={"cpu": 100},
    hint="build the extension: `pip install --no-build-isolation -e .` (needs a C++ compiler and ninja)")
