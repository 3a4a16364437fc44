"""The ``triton`` backend object of ``lnsr.kernels`` (docs/design.md §5, issue 3).

``backend()`` is what ``lnsr.ops.dispatch`` loads for ``backend="triton"``: a ``TritonBackend``,
the backend contract of ``lnsr.ops.backend`` on the ops ``torch.ops.lnsr_triton.*`` defined in
``_triton``.  Triton is imported only there, so that importing ``lnsr.kernels`` never fails on a
machine without it.  The kernels run on CUDA tensors, and on CPU tensors when
``TRITON_INTERPRET=1`` was set before the first ``backend()`` call (Triton picks the interpreter
when a kernel is defined).
"""
from __future__ import annotations

import os
import re

import torch

from lnsr.ops.backend import OpsBackend

__all__ = ["backend", "TritonBackend", "TRITON_MIN"]

# The oldest Triton whose tl.randn4x splits a 64-bit offset into both Philox counter words (the
# stream of docs/design.md §2); older ones draw another stream past 2**32 counters.  setup.py pins it.
TRITON_MIN = (3, 4)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:2])


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
    version = getattr(triton, "__version__", "0")
    if _version_tuple(version) < TRITON_MIN:
        raise ImportError(f"triton {version} is too old: lnsr's noise stream needs triton>="
                          f"{'.'.join(map(str, TRITON_MIN))} (`pip install -U 'triton>=3.4'`)")
    from . import _triton as impl  # defines the ops (once)

    return TritonBackend(impl.INTERPRETED)
