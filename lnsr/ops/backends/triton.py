"""The ``triton`` backend: the Triton kernels of ``lnsr.kernels`` (``kernels/`` in the source tree).

Its class, ``lnsr.kernels.TritonBackend`` (``kernels/_backend.py``), stays with its kernels so that
``lnsr.kernels`` is whole on its own; Triton is imported on first use, by ``kernels.backend()``, which
raises ImportError when it is missing or older than ``TRITON_MIN``.  ``auto`` takes it on CUDA after
the ``cuda`` backend (on the CPU it runs only under ``TRITON_INTERPRET=1``, for the tests).
"""
from __future__ import annotations

from .registry import register_backend


def load():
    from ... import kernels  # lnsr.kernels

    return kernels.backend()


register_backend(
    "triton", load, auto={"cuda": 100},
    hint="install Triton (`pip install triton`, bundled with CUDA builds of torch) and use CUDA tensors")
