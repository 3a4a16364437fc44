"""Integrations with training frameworks (imported lazily: transformers' Trainer needs accelerate,
``LNSRSFTTrainer`` needs TRL)."""


def __getattr__(name):
    if name == "LNSRTrainer":
        from .trainer import LNSRTrainer
        return LNSRTrainer
    if name == "LNSRSFTTrainer":
        from .trl import LNSRSFTTrainer
        return LNSRSFTTrainer
    raise AttributeError(f"module 'lnsr.integrations' has no attribute {name!r}")


__all__ = ["LNSRTrainer", "LNSRSFTTrainer"]
