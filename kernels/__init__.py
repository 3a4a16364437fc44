"""Triton kernels of the lnsr ops, installed as ``lnsr.kernels`` (docs/design.md §4, issue 3).

``backend()`` is what ``lnsr.ops.dispatch`` loads for ``backend="triton"``: a ``TritonBackend``,
the backend contract of ``lnsr.ops.backend`` on the ops ``torch.ops.lnsr_triton.*`` defined in
``_triton``.  Triton is imported only there, so that importing ``lnsr.kernels`` never fails on a
machine without it.  The kernels run on CUDA tensors, and on CPU tensors when
``TRITON_INTERPRET=1`` was set before the first ``backend()`` call (Triton picks the interpreter
when a kernel is defined).
"""
from __future__ import annotations

import os

import torch

from lnsr.ops.backend import OpsBackend

__all__ = ["backend", "TritonBackend"]


class TritonBackend(OpsBackend):
    """The ``triton`` backend: the ops ``torch.ops.lnsr_triton.*`` (kernels/_triton.py)."""

    name = "triton"
    namespace = "lnsr_triton"

    def __init__(self, interpreted: bool):
        self.interpreted = interpreted  # the kernels were defined under TRITON_INTERPRET=1

    def supports(self, device) -> bool:
        device = torch.device(device)
        if device.type == "cuda":
            return True  # compiled kernels (or, under TRITON_INTERPRET=1, the interpreter copying to host)
        if device.type == "cpu":
            # Kernels defined under the interpreter run on CPU tensors, and only those.
            return self.interpreted and os.environ.get("TRITON_INTERPRET") == "1"
        return False


def backend() -> TritonBackend:
    """The ``triton`` backend object; ImportError when Triton is missing or unusable."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        raise ImportError(f"triton is not importable ({type(exc).__name__}: {exc})") from exc
    from . import _triton as impl  # defines the ops (once)

    return TritonBackend(impl.INTERPRETED)
