"""Integrations with training frameworks (imported lazily: transformers' Trainer needs accelerate)."""


def __getattr__(name):
    if name == "LNSRTrainer":
        from .trainer import LNSRTrainer
        return LNSRTrainer
    raise AttributeError(f"module 'lnsr.integrations' has no attribute {name!r}")


__all__ = ["LNSRTrainer"]
