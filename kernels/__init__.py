"""Triton kernels of the lnsr ops, installed as ``lnsr.kernels`` (DESIGN §4, issue 3)."""
