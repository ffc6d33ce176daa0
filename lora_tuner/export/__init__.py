"""Merge and export: an adapter folded into its base as standalone Hugging Face weights, verified."""
from .merge import merge

__all__ = ["merge"]
