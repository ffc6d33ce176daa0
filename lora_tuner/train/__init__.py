"""Training: a trainer driven by a recipe, writing a complete run folder. `run` and `RunResult` are imported on first
use, so that plan, which needs only response_loss's constants, does not import TRL."""
import importlib

__all__ = ["RunResult", "run"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'lora_tuner.train' has no attribute {name!r}")
    return getattr(importlib.import_module(".run", __name__), name)
