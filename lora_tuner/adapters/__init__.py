"""Adapters: many LoRA adapters on one base model in memory, switched per call."""
from .pool import AdapterPool

__all__ = ["AdapterPool"]
