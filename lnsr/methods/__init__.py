"""Regularisation methods for fine-tuning: the registry (``registry``: ``Method``, ``METHODS``,
``register_method``, ``parse_method_spec``; ``vanilla`` and ``lnsr``) and the papers' baselines
(``baselines``: ``l2sp``, ``mixout``, ``r3f``, ``smart``, registered by importing this package)."""
from .registry import METHODS, Method, parse_method_spec, register_method
from . import baselines  # noqa: F401  (its classes register themselves)

__all__ = ["METHODS", "Method", "parse_method_spec", "register_method"]
