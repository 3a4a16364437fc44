"""Helpers shared by the tools (``lnsr.benchmarks``, ``lnsr.finetune``, the scripts in ``bench/``).

The core (``lnsr.ops``, ``lnsr.LNSR``) does not use them; the tools import from here rather than
from each other.  ``machine``: what the machine is and how long things take on it.
"""
